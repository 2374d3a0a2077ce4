"""How a model joins an item's two modalities, its ids and its creative, into one vector.

`ConcatFusion` (the baselines) projects both together. `ConfidenceFusion` (FIN) follows Predictive Dynamic
Fusion (Cao et al., ICML 2024) in spirit: each modality is projected alone, and how much of the creative's
projection joins the ids' is decided per row by how far each modality can be trusted. A confidence network
per modality reads only that modality's input and predicts how well a CTR head on that modality alone does
on rows like it (the log of the probability it gives the true label, the log of PDF's true-class
probability), trained by regression on the candidates' outcomes (`UnimodalHeads.auxiliary_loss`); the
creative's weight is its share of a softmax over the two predicted confidences, sharpened by a learned
temperature. A row whose ids predict poorly for their kind (a new ad's untrained id rows) takes more of
its creative; a well-known ad's ids keep the row to themselves. A row without a creative takes none. The
weights take no gradient from the click loss: they follow the predicted confidences alone, as PDF's do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fin.layers import MLP

MODALITIES = ("id", "image")


class ConcatFusion(nn.Module):
    """[ids, creative embedding, has one] -> one projection."""

    def __init__(self, id_dim: int, image_dim: int, out_dim: int):
        super().__init__()
        self.id_dim = id_dim
        self.project = nn.Linear(id_dim + image_dim + 1, out_dim)

    def forward(self, ids: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """ids [n, I]; the creative embeddings `table` [K, E] (row 0: none) and each row's entry in it [n]. The
        image part is projected once per table row, then gathered (a batch has many more events than items)."""
        w, i = self.project.weight, self.id_dim
        image = F.linear(table, w[:, i:-1])
        known = (rows > 0).to(ids.dtype).unsqueeze(1)
        return F.linear(ids, w[:, :i], self.project.bias) + image.index_select(0, rows) + known * w[:, -1]


class ModalityConfidence(nn.Module):
    """The confidence networks, one per modality: its input -> the predicted log-probability that a head on
    it alone gives the true label (higher: more to be trusted). Shared by every place a model fuses (the
    candidate and the history events live in one space)."""

    def __init__(self, id_dim: int, image_dim: int, hidden: int = 16):
        super().__init__()
        self.nets = nn.ModuleDict({"id": MLP(id_dim, (hidden,), 1), "image": MLP(image_dim, (hidden,), 1)})
        self.log_temperature = nn.Parameter(torch.tensor(2.0))

    def forward(self, ids: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[n, 2] predicted confidences, in MODALITIES order."""
        return torch.cat([self.nets["id"](ids), self.nets["image"](table).index_select(0, rows)], dim=1)

    def weights(self, confidence: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """[n, 2] mixing weights from detached confidences; a row without a creative weighs its ids alone."""
        logits = confidence.detach() * self.log_temperature.exp()
        logits = torch.stack([logits[:, 0], logits[:, 1].masked_fill(~known, float("-inf"))], dim=1)
        return torch.softmax(logits, dim=1)


class ConfidenceFusion(nn.Module):
    """Each modality projected alone; the image's projection added to the ids' with the image's confidence
    weight: ids [n, I] and image rows [n] of a table [K, E] (row 0: none) -> [n, out_dim]. The ids' projection
    is kept whole (mixing both by weights that sum to one scaled it down and cost warm-ad AUC: 0.826 against
    0.834 in the same short run, benchmarks/README.md). Image projections and confidences are computed once
    per table row and gathered."""

    def __init__(self, id_dim: int, image_dim: int, out_dim: int, confidence: ModalityConfidence):
        super().__init__()
        self.project = nn.ModuleDict({"id": nn.Linear(id_dim, out_dim), "image": nn.Linear(image_dim, out_dim)})
        self.confidence = confidence

    def projections(self, ids: torch.Tensor, table: torch.Tensor,
                    rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.project["id"](ids), self.project["image"](table).index_select(0, rows)

    def forward(self, ids: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        h_id, h_image = self.projections(ids, table, rows)
        w = self.confidence.weights(self.confidence(ids, table, rows), rows > 0)
        return h_id + w[:, 1:] * h_image


class UnimodalHeads(nn.Module):
    """A CTR head per modality on the candidate's projection of that modality alone, beside the request's
    context: what the confidences are taught to predict the quality of."""

    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(dim + context_dim, 1) for m in MODALITIES})

    def auxiliary_loss(self, fusion: ConfidenceFusion, ids: torch.Tensor, table: torch.Tensor, rows: torch.Tensor,
                       context: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Per candidate [B]: each head's log loss, plus the squared error of each confidence against the
        log-probability its head gave the true label (the image terms only where the candidate has one)."""
        projected = dict(zip(MODALITIES, fusion.projections(ids, table, rows)))
        confidence = fusion.confidence(ids, table, rows)
        known = (rows > 0).to(label.dtype)
        total = torch.zeros_like(label)
        for i, m in enumerate(MODALITIES):
            logit = self.heads[m](torch.cat([projected[m], context], dim=1)).squeeze(1)
            loss = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
            term = loss + (confidence[:, i] + loss.detach()) ** 2
            total = total + (term if m == "id" else term * known)
        return total
