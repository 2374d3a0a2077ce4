"""Benchmark: how much cold-start AUC a creative can be worth in a simulated world, and how much of it the
creative encoder's embedding carries.

On the test split's impressions of cold-start ads (first shown in the test split) and of warm ones: the AUC
of the simulator's true click logit (the oracle), of the same logit without the shop's appeal term (the one
attribute a creative shows that a new ad's ids do not), and with the appeal term put back as read from the
creative embeddings by a linear probe fitted on the train split's items (no model, no training: what the
embedding can tell, not what a model makes of it). `gap_share`: the cold-start goal's measure for these
logits, (cold AUC with the appeal - cold AUC without) / (warm AUC without - cold AUC without).
Usage: python benchmarks/creative_ceiling.py --logs DIR --data FEATURES   (e.g. demo_out/logs demo_out/features)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from _measure import report


def main() -> None:

    from features.dataset import EXAMPLES, Dataset
    from features.item_embeddings import ItemEmbeddings, embeddings_source
    from features.simulator.config import load_sim_config
    from features.simulator.world import build_world
    from fin.evaluate import new_items
    from fin.metrics import auc

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", type=Path, required=True, help="the simulated log folder")
    parser.add_argument("--data", type=Path, required=True, help="fin features output with creative embeddings")
    args = parser.parse_args()
    manifest = json.loads((args.logs / "manifest.json").read_text())
    config = load_sim_config(**{f"{section}.{k}": v for section in ("city", "shops", "users")
                                for k, v in manifest["config"][section].items()}, seed=manifest["config"]["seed"])
    world, weight = build_world(config), manifest["config"]["click"]["appeal"]
    data = Dataset.at(args.data)
    test = data.scan(EXAMPLES, "test").select("item_id", "shop_id", "position", "label", "oracle_click_prob").collect()
    examination = np.asarray(manifest["examination"])[np.minimum(test["position"].to_numpy(), len(manifest["examination"]) - 1)]
    p = test["oracle_click_prob"].to_numpy() / examination
    logit = np.log(p / (1 - p)) + np.log(examination)  # as shown: the slot's examination kept
    appeal = world.shop_appeal[test["shop_id"].to_numpy() - 1]

    embeddings = ItemEmbeddings.read(embeddings_source(data))
    features = np.c_[embeddings.vectors[1:], np.ones(len(embeddings.ids))]
    item_appeal = world.shop_appeal[world.item_shop[embeddings.ids - 1]]
    fitted_on = np.isin(embeddings.ids, data.scan(EXAMPLES, "train").select("item_id").unique().collect()["item_id"])
    coef = np.linalg.lstsq(features[fitted_on], item_appeal[fitted_on], rcond=None)[0]
    probe = features @ coef
    read = probe[embeddings.rows(test["item_id"].to_numpy()) - 1]

    cold = np.isin(test["item_id"].to_numpy(), new_items(data.root, "test"))
    labels = test["label"].to_numpy()
    logits = {"oracle": logit, "without_appeal": logit - weight * appeal,
              "appeal_read_from_embedding": logit - weight * (appeal - read)}
    out = {"appeal_weight": weight, "cold_impressions": int(cold.sum()), "warm_impressions": int((~cold).sum()),
           "probe_correlation_unseen_items": round(float(np.corrcoef(probe[~fitted_on], item_appeal[~fitted_on])[0, 1]), 4),
           "auc": {name: {"cold": round(auc(labels[cold], s[cold]), 4), "warm": round(auc(labels[~cold], s[~cold]), 4)}
                   for name, s in logits.items()}}
    a = out["auc"]
    out["creative_worth_cold_auc"] = round(a["oracle"]["cold"] - a["without_appeal"]["cold"], 4)
    out["embedding_carries_cold_auc"] = round(a["appeal_read_from_embedding"]["cold"] - a["without_appeal"]["cold"], 4)
    # the cold-start goal's measure for these logits: what the creative adds on cold ads, as a share of the
    # gap between cold and warm ads without it (the share a model that knew everything else would close)
    blind = a["without_appeal"]
    out["gap_share"] = {name: round((a[name]["cold"] - blind["cold"]) / (blind["warm"] - blind["cold"]), 4)
                        for name in ("oracle", "appeal_read_from_embedding")}
    report("creative_ceiling", out)


if __name__ == "__main__":
    main()
