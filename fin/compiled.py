"""The compiled scoring path: one request's forward, exported whole and compiled ahead of time.

`ScoringGraph` is the forward of one scoring request from its raw inputs (the user's timeline, the
request's context, the candidates) to calibrated pCTR: fragments cut inside it by the one set of fragment
rules (`features.fragments.fragment_slots`, fixed widths, so nothing depends on the data's values), then
the model's own modules on the artifact's weights. `torch.export` traces it with the history length and
the number of candidates as dynamic dimensions, and AOTInductor compiles the exported graph into a package
(a shared library and its weights in one file, `model.pt2`): a call runs the whole forward in C++ with no
Python or dispatcher between its operations. The package needs torch alone
(`torch._inductor.aoti_load_package`), the way a team would call it from its own C++ or Triton's PyTorch
backend; its inputs are `GraphInputs`. A model with an image modality takes the request's creative
embeddings as three more inputs (the table and each candidate's and event's row of it).

Training keeps the eager model; the package is the same weights. An artifact's package is built and checked
against the eager forward on held-out requests when the artifact is written (`build_package`), and the
server scores with it when it loads and passes its check (`load_package`), eagerly otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from features.fragments import fragment_slots
from features.item_embeddings import ItemEmbeddings
from features.sequences import TIMELINE_FIELDS
from fin.calibration import PlattScaling
from fin.calibration import pctr as calibrated_pctr
from fin.embeddings import read_rows
from fin.inputs import (
    CANDIDATE_NUMBERS,
    CONTEXT_FEATURES,
    FRAGMENT_CONTEXT,
    STAT_FEATURES,
    TARGET_FEATURES,
    Batch,
    Histories,
    ItemImages,
    LoaderConfig,
    ScoringRequest,
    requests_batch,
)
from fin.models import CTRModel
from fin.versions import sha256

PACKAGE = "model.pt2"
MAX_CANDIDATES = 10_000  # the most candidates of a request a package takes (more: scored eagerly)
MAX_CREATIVES = 100_000  # the most creative embeddings (table rows) of a request a package takes
REQUEST_FIELDS = ("ts", *CONTEXT_FEATURES)  # the context row of `GraphInputs`, in this order


@dataclass
class GraphInputs:
    """One request as the graph reads it (every tensor on the CPU, contiguous):

    timeline    int64 [len(TIMELINE_FIELDS), N]: the user's last N events before the request, oldest first
                (1 <= N <= the artifact's max_seq_len; events at or after the request time are ignored, so a
                user without events passes one event at the request time)
    context     int64 [len(REQUEST_FIELDS)]: the request time (ms) and its context ids (MISSING when unknown)
    candidates  int64 [B, len(TARGET_FEATURES)]: the candidates' ids
    numbers     float32 [B, len(CANDIDATE_NUMBERS)]: their price and distance (0: unknown)
    stats       float32 [B, len(STAT_FEATURES)]: their point-in-time statistics
    and, for a model with an image modality (`fin.inputs.ItemImages`):
    images      float32 [K, E]: the creative embeddings of the request's items, row 0 all zeros (none)
    image_rows  int64 [B]: each candidate's row of `images`
    event_image_rows int64 [N]: each timeline event's row of `images`
    """

    timeline: torch.Tensor
    context: torch.Tensor
    candidates: torch.Tensor
    numbers: torch.Tensor
    stats: torch.Tensor
    images: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None
    event_image_rows: torch.Tensor | None = None

    def args(self) -> tuple[torch.Tensor, ...]:
        images = () if self.images is None else (self.images, self.image_rows, self.event_image_rows)
        return self.timeline, self.context, self.candidates, self.numbers, self.stats, *images

    @classmethod
    def of(cls, request: ScoringRequest, max_len: int, image_dim: int = 0) -> GraphInputs:
        """The graph's inputs of a scoring request: its timeline's last `max_len` events before the request
        (as `fin.inputs.requests_batch` reads them), one placeholder event for a user without any; with
        `image_dim`, its items' creative embeddings (none known: a table of row 0 alone)."""
        ts = int(request.context["ts"])
        times = np.asarray(request.timeline["ts"])
        end = int(np.searchsorted(times, ts, side="left"))
        start = max(end - max_len, 0)
        if end > start:
            timeline = np.stack([np.asarray(request.timeline[f][start:end], np.int64) for f in TIMELINE_FIELDS])
        else:  # at the request time: before nothing, so every fragment leaves it out
            timeline = np.zeros((len(TIMELINE_FIELDS), 1), np.int64)
            timeline[TIMELINE_FIELDS.index("ts")] = ts
        b = len(request)
        numbers = np.stack([np.asarray(request.candidates[c], np.float32) if c in request.candidates
                            else np.zeros(b, np.float32) for c in CANDIDATE_NUMBERS], axis=1)
        stats = (np.zeros((b, len(STAT_FEATURES)), np.float32) if request.stats is None
                 else np.ascontiguousarray(request.stats, np.float32))
        inputs = cls(timeline=torch.from_numpy(timeline),
                     context=torch.tensor([int(request.context[c]) for c in REQUEST_FIELDS], dtype=torch.int64),
                     candidates=torch.from_numpy(np.stack([np.asarray(request.candidates[c], np.int64)
                                                           for c in TARGET_FEATURES], axis=1)),
                     numbers=torch.from_numpy(numbers), stats=torch.from_numpy(stats))
        if image_dim:
            known = request.images
            if known is None:
                known = ItemEmbeddings.of(np.zeros(0, np.int64), np.zeros((0, image_dim), np.float32))
            events = (np.asarray(request.timeline["item_id"][start:end], np.int64) if end > start
                      else np.zeros(1, np.int64))
            images = ItemImages.of(known, np.asarray(request.candidates["item_id"], np.int64), events)
            if end <= start:  # the placeholder event has no item
                images.history.zero_()
            inputs.images, inputs.image_rows, inputs.event_image_rows = images.table, images.candidate, images.history
        return inputs


class ScoringGraph(nn.Module):
    """One request's forward as a module of tensors in, calibrated pCTR [B] (float64) out: the graph that
    is exported. Scores equal the eager model's (`serving.scoring.score_requests`) up to the order of
    floating-point sums."""

    def __init__(self, model: CTRModel, loader: LoaderConfig, calibration: PlattScaling | None):
        super().__init__()
        self.model, self.loader, self.calibration = model.eval(), loader, calibration
        # the tables stacked once (as the eager scoring path reads them), held as this module's buffers
        self.shared, self.single = model.sparse.stacked()

    def forward(self, timeline: torch.Tensor, context: torch.Tensor, candidates: torch.Tensor,
                numbers: torch.Tensor, stats: torch.Tensor, images: torch.Tensor | None = None,
                image_rows: torch.Tensor | None = None, event_image_rows: torch.Tensor | None = None) -> torch.Tensor:
        b, n = candidates.shape[0], timeline.shape[1]
        history = dict(zip(TIMELINE_FIELDS, timeline.unbind(0)))
        request = {c: context[i:i + 1] for i, c in enumerate(REQUEST_FIELDS)}
        ids = ({c: candidates[:, i] for i, c in enumerate(TARGET_FEATURES)}
               | {c: request[c].expand(b) for c in CONTEXT_FEATURES})
        zeros = torch.zeros(1, dtype=torch.int64)
        batch = Batch(
            label=numbers.new_zeros(b), ids=ids, stats=stats, numbers=numbers, ts=request["ts"],
            request_context={c: request[c] for c in FRAGMENT_CONTEXT},
            histories=Histories(offsets=torch.stack([zeros[0], zeros[0] + n]), values=history, start=zeros,
                                end=zeros + n),
            row_id=torch.full((b,), -1, dtype=torch.int64), request_of=torch.zeros(b, dtype=torch.int64),
            fragments=fragment_slots(history, request, self.loader.max_seq_len, self.loader.fragments),
            images=None if images is None else ItemImages(images, image_rows, event_image_rows))
        return calibrated_pctr(self.model(batch, read_rows(batch, self.shared, self.single)), self.calibration)


def example_inputs(max_len: int, candidates: int = 8, events: int = 16, image_dim: int = 0) -> GraphInputs:
    """Inputs to trace the graph with (any values: the graph's shapes do not depend on them)."""
    rng = np.random.default_rng(0)
    timeline = rng.integers(1, 1000, (len(TIMELINE_FIELDS), min(events, max_len)))
    timeline[TIMELINE_FIELDS.index("ts")] = np.arange(timeline.shape[1])
    inputs = GraphInputs(
        timeline=torch.from_numpy(timeline),
        context=torch.from_numpy(np.concatenate([[10**6], rng.integers(1, 1000, len(CONTEXT_FEATURES))])),
        candidates=torch.from_numpy(rng.integers(1, 1000, (candidates, len(TARGET_FEATURES)))),
        numbers=torch.rand(candidates, len(CANDIDATE_NUMBERS)),
        stats=torch.rand(candidates, len(STAT_FEATURES)))
    if image_dim:
        known = 5  # table rows besides row 0
        inputs.images = torch.cat([torch.zeros(1, image_dim), torch.rand(known, image_dim)])
        inputs.image_rows = torch.from_numpy(rng.integers(0, known + 1, candidates))
        inputs.event_image_rows = torch.from_numpy(rng.integers(0, known + 1, timeline.shape[1]))
    return inputs


# AOTInductor's options: no pattern rewrites, which on a CPU would fuse the bias adds split off below back
# into `addmm` (measured: the package's forward ~4% shorter without them)
COMPILE_OPTIONS = {"pattern_matcher": False}


def export(graph: ScoringGraph, max_candidates: int = MAX_CANDIDATES) -> torch.export.ExportedProgram:
    """The graph exported with the history length (1 .. max_seq_len), the candidate count
    (1 .. `max_candidates`) and the creative embeddings' rows dynamic, each linear layer's bias added apart
    (`_bias_apart`)."""
    events = torch.export.Dim("events", min=1, max=graph.loader.max_seq_len)
    count = torch.export.Dim("candidates", min=1, max=max_candidates)
    shapes = ({1: events}, None, {0: count}, {0: count}, {0: count})
    image_dim = graph.model.config.image_dim
    if image_dim:  # the table: row 0 and one per item of the request with an embedding
        rows = torch.export.Dim("creatives", min=1, max=MAX_CREATIVES)
        shapes = (*shapes, {0: rows}, {0: count}, {0: events})
    inputs = example_inputs(graph.loader.max_seq_len, image_dim=image_dim)
    with torch.no_grad():
        program = torch.export.export(graph, inputs.args(), dynamic_shapes=shapes)
    _bias_apart(program)
    return program


def _bias_apart(program: torch.export.ExportedProgram) -> None:
    """linear(x, w, b) -> linear(x, w) + b in the program's graph. On a CPU a linear layer with a bias runs as
    `addmm`, which first copies the bias into every row of its output (one more pass over [B, width] per
    layer of the tower); as a pointwise add, the compiler fuses the bias with the ReLU after it."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.linear.default or len(node.args) < 3 or node.args[2] is None:
            continue
        x, weight, bias = node.args[:3]
        with graph.inserting_after(node):
            product = graph.call_function(torch.ops.aten.linear.default, (x, weight))
        with graph.inserting_after(product):
            added = graph.call_function(torch.ops.aten.add.Tensor, (product, bias))
        product.meta, added.meta = dict(node.meta), dict(node.meta)
        node.replace_all_uses_with(added)
        graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()


TOLERANCE = 1e-5  # the largest pCTR difference from the eager forward a package may have to be used


def eager_pctr(model: CTRModel, loader: LoaderConfig, calibration: PlattScaling | None,
               request: ScoringRequest) -> np.ndarray:
    """One request's pCTR through the eager model, as the server scores it without a package."""
    with torch.inference_mode():
        return calibrated_pctr(model(requests_batch([request], loader)), calibration).numpy().astype(np.float64)


def build_package(folder: str | Path, model: CTRModel, loader: LoaderConfig, calibration: PlattScaling | None,
                  requests: Sequence[ScoringRequest]) -> dict:
    """Export and compile the model's `ScoringGraph` into `folder/PACKAGE` and check it on `requests`
    against the eager forward. Returns the artifact.json `compiled` entry: the package, its checksum and
    the largest pCTR difference found; or, when the model does not export (a shape that depends on the
    data), does not compile, or differs by more than TOLERANCE, the error, with no package left behind."""
    path = Path(folder) / PACKAGE
    started = time.perf_counter()
    try:
        if model.not_exportable:
            raise TypeError(f"{type(model).__name__} does not export: {model.not_exportable}")
        graph = ScoringGraph(model, loader, calibration)
        with _quiet_compiler():
            torch._inductor.aoti_compile_and_package(export(graph), package_path=str(path),
                                                     inductor_configs=COMPILE_OPTIONS)
        package = CompiledScorer(load_package(path), loader.max_seq_len, model.config.image_dim)
        worst = max((float(np.max(np.abs(package.pctr(r) - eager_pctr(model, loader, calibration, r))))
                     for r in requests), default=0.0)
        if not worst <= TOLERANCE:
            raise ValueError(f"its pCTRs differ from the eager forward's by up to {worst:.3g} (> {TOLERANCE})")
    except Exception as e:  # noqa: BLE001 - any failure leaves the artifact without a package, served eagerly
        path.unlink(missing_ok=True)
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500],
                "torch": torch.__version__}
    return {"package": PACKAGE, "sha256": sha256(path), "max_abs_pctr_difference": worst,
            "requests_checked": len(requests), "seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__}


@contextlib.contextmanager
def _quiet_compiler():
    """torch's exporter logs the whole graph when a model does not export, and its compiler deprecation
    notices of its own internals: the one-line reason in the artifact is what a user can act on."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def load_package(path: str | Path):
    """A package's compiled model (`torch._inductor.aoti_load_package`)."""
    return torch._inductor.aoti_load_package(str(path))


class CompiledScorer:
    """A loaded package, scoring `ScoringRequest`s: what the server calls instead of the eager model."""

    def __init__(self, package, max_len: int, image_dim: int = 0):
        self.package, self.max_len, self.image_dim = package, max_len, image_dim

    @staticmethod
    def takes(request: ScoringRequest) -> bool:
        """Whether the package's shapes admit the request (any history: it is cut to max_seq_len)."""
        return len(request) <= MAX_CANDIDATES and (request.images is None or len(request.images.ids) < MAX_CREATIVES)

    def pctr(self, request: ScoringRequest) -> np.ndarray:
        """pCTR [B] (float64) of the request's candidates."""
        inputs = GraphInputs.of(request, self.max_len, self.image_dim)
        # the loader's own call: `package(...)` would parse the package's input and output specs every call
        (out,) = self.package.loader.run(list(inputs.args()))
        return out.numpy().astype(np.float64)
