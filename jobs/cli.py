"""The `fin` command line. Each subcommand is a thin shell over a library function.

Errors are printed as one line (`fin <command>: error: ...`) with a non-zero exit status; set
FIN_DEBUG=1 to see the traceback instead. Progress bars go to stderr and only on a terminal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

EXIT_ERROR = 1
EXIT_VALIDATION_FAILED = 3


class CommandError(Exception):
    """An expected failure: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def _progress(total: int, unit: str, desc: str) -> tqdm:
    return tqdm(total=total, unit=unit, desc=desc, disable=None, file=sys.stderr, dynamic_ncols=True)


def _time_ms(text: str) -> int:
    """Milliseconds since the epoch, from an integer or an ISO date/time (UTC unless an offset is given)."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use milliseconds or ISO like 2026-03-02T00:00+08:00)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1000)


# ---------------------------------------------------------------------------- simulate
def _cmd_simulate(args: argparse.Namespace) -> int:
    from features.simulator import load_sim_config, simulate
    from features.simulator.run import chunk_bounds

    config = load_sim_config(args.config, **{
        "seed": args.seed, "days": args.days, "start_date": args.start_date, "users.users": args.users,
        "chunk_users": args.chunk_users, "workers": args.workers,
    })
    total = config.days * len(chunk_bounds(config))
    with _progress(total, "chunk-day", "simulate") as bar:
        manifest = simulate(config, args.out, overwrite=args.overwrite, progress=bar.update)
    rows = manifest["rows"]
    print(f"wrote {args.out}: {rows['behaviours']:,} behaviours, {rows['impressions']:,} impressions "
          f"({manifest['requests']:,} requests, {manifest['clicks']:,} clicks), {rows['users']:,} users, "
          f"{config.days} days, in {manifest['wall_s']:.1f}s")
    if args.report:
        from fin import signal_report

        print(json.dumps(signal_report.signal_report(args.out), indent=2))
    return 0


# ---------------------------------------------------------------------------- validate
def _cmd_validate(args: argparse.Namespace) -> int:
    from features.validate import ValidationConfig, validate_logs, write_report

    config = ValidationConfig(max_bad_fraction=args.max_bad_fraction, window_start_ms=args.window_start,
                              window_end_ms=args.window_end)
    report = validate_logs(args.logs, config)
    summary_path = write_report(report, args.out or args.logs)
    for name, t in report.tables.items():
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(t.reasons.items())) or "-"
        print(f"{name:12s} rows={t.rows:<10,} quarantined={t.quarantine.height:<8,} ({t.bad_fraction:.2%})  {reasons}")
        for note in t.notes:
            print(f"{'':12s} note: {note}")
    print(f"summary: {summary_path}")
    if not report.passed:
        raise CommandError(f"bad-row fraction above {args.max_bad_fraction:.2%} in: {', '.join(report.failed_tables)}",
                           EXIT_VALIDATION_FAILED)
    return 0


# ---------------------------------------------------------------------------- convert-eleme
def _cmd_convert_eleme(args: argparse.Namespace) -> int:
    from features.eleme import ElemeConfig, convert_eleme

    config = ElemeConfig(timediff_unit=args.timediff_unit, utc_offset_hours=args.utc_offset_hours)
    manifest = convert_eleme(args.csv, args.out, config, overwrite=args.overwrite)
    rows = manifest["rows"]
    print(f"wrote {args.out}: {rows['impressions']:,} impressions, {rows['behaviours']:,} behaviours from histories, "
          f"{manifest['quarantined_rows']:,} malformed rows in {args.out}/quarantine/eleme_rows.parquet")
    return 0


# ---------------------------------------------------------------------------- features
def _cmd_features(args: argparse.Namespace) -> int:
    from jobs.features_config import FeaturesConfig
    from jobs.features_job import run_features

    config = FeaturesConfig(max_seq_len=args.max_seq_len, partitions=args.partitions,
                            validation_days=args.validation_days, test_days=args.test_days,
                            max_bad_fraction=args.max_bad_fraction, ray_address=args.ray_address,
                            num_cpus=args.num_cpus, online_store=args.online_store,
                            redis_connection=args.redis, materialize=not args.no_materialize)
    steps = 3 + config.partitions  # Ray start, sharding, one per partition, Feast
    with _progress(steps, "step", "features") as bar:
        def progress(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        stats = run_features(args.logs, args.out, config, progress)
    v = stats["validation"]
    print(f"wrote {args.out}/data: {stats['users']:,} users, examples "
          + ", ".join(f"{s}={n:,}" for s, n in stats["examples"].items())
          + f"; quarantined behaviours={v['behaviours']['quarantined']:,} impressions={v['impressions']['quarantined']:,}; "
          f"Feast repo {stats['feast_repo']}; {stats['timings_s']['total_s']:.1f}s")
    return 0


# ---------------------------------------------------------------------------- train
def _cmd_train(args: argparse.Namespace) -> int:
    from fin.train import load_train_config, train

    config = load_train_config(args.config, **{
        "model": args.model, "epochs": args.epochs, "workers": args.workers, "sharding": args.sharding,
        "lr": args.lr, "sparse_lr": args.sparse_lr, "patience": args.patience, "max_steps": args.max_steps,
        "seed": args.seed, "loader.batch_size": args.batch_size, "loader.max_seq_len": args.max_seq_len,
    })
    if args.init_from is not None and not (args.init_from / "artifact.json").is_file():
        raise CommandError(f"--init-from {args.init_from} is not an artifact version folder (MODELS/NAME/VERSION)")
    # stdout: the artifact folder, for scripts
    print(train(args.data, args.out, config, name=args.name, init_from=args.init_from))
    return 0


# ---------------------------------------------------------------------------- evaluate
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fin.artifact import load_artifact
    from fin.auction import AuctionConfig
    from fin.evaluate import evaluate, markdown, write_report
    from fin.revenue import ReplayConfig
    from fin.versions import resolve

    artifacts = [load_artifact(resolve(spec, args.repo)) for spec in args.models]
    try:
        auction = AuctionConfig(rule=args.auction, slots=args.slots, reserve=args.reserve)
    except ValueError as e:
        raise CommandError(str(e)) from None
    with _progress(None, "rows", "evaluate") as bar:
        report = evaluate(args.data, artifacts, args.split, progress=bar.update, auction_config=auction,
                          replay=ReplayConfig(bootstrap=args.bootstrap))
    paths = write_report(report, args.out)
    print(markdown(report))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from fin.promotion import PromotionGate, decide
    from fin.versions import ArtifactError, promote, promoted

    candidate = f"{args.name}/{args.version}"
    if args.report is not None:
        try:
            report = json.loads(args.report.read_text())
            current = promoted(args.models, args.name)
            decision = decide(report, candidate, None if current is None else f"{args.name}/{current}",
                              PromotionGate(args.auc_tolerance, args.rpm_tolerance))
        except (OSError, ValueError) as e:
            raise CommandError(str(e)) from None
        (args.report.parent / "promotion.json").write_text(json.dumps(decision.to_dict(), indent=2) + "\n")
        print(f"{candidate}: {'promoted' if decision.promote else 'not promoted'} "
              f"(against {decision.current or 'no default'}): {'; '.join(decision.reasons)}")
        if not decision.promote:
            return 0
    try:
        promote(args.models, args.name, args.version)
    except ArtifactError as e:
        raise CommandError(str(e)) from None
    print(f"{args.models}/{args.name}: version {args.version} is the default (servers pick it up at their next scan)")
    return 0


def _schedule_config(path: Path):
    from jobs.schedule import load_schedule

    try:
        return load_schedule(path)
    except (OSError, ValueError) as e:
        raise CommandError(str(e)) from None


def _cmd_schedule(args: argparse.Namespace) -> int:
    import time as _time

    from jobs.schedule import Scheduler

    config = _schedule_config(args.config)
    scheduler = Scheduler(config, say=lambda line: print(line, flush=True))
    try:
        while True:
            runs = scheduler.tick()
            failed = [r for r in runs if r["status"] == "failed" and r["next_attempt"] is None]
            if args.once:
                print(f"{len(runs)} run(s); {len(failed)} failed for good" if runs else "nothing due")
                return 1 if failed else 0
            _time.sleep(args.poll_s)
    finally:
        scheduler.close()


def _cmd_runs(args: argparse.Namespace) -> int:
    from jobs.schedule import RunStore

    store = RunStore(_schedule_config(args.config).state)
    rows = store.all()
    store.close()
    print("| run | status | attempts | started (UTC) | seconds | outputs / error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        started = dt.datetime.fromtimestamp(r["started"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        detail = r["error"] or r["outputs"]
        retry = "" if r["next_attempt"] is None or r["status"] == "done" else " (retry pending)"
        print(f"| {r['run_id']} | {r['status']}{retry} | {r['attempts']} | {started} | {r['seconds']:.1f} | {detail} |")
    return 0


# ---------------------------------------------------------------------------- serve / score
def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from serving.config import ScoringConfig, ServerConfig
    from serving.server import log_to_stderr, serve

    for name, path in (("--models", args.models), ("--feast-repo", args.feast_repo)):
        if not path.is_dir():
            raise CommandError(f"{name} {path} is not a folder")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CommandError("give both --tls-cert and --tls-key, or neither")
    if args.processes < 1 or args.workers < 1:
        raise CommandError("--processes and --workers must be at least 1")
    log_to_stderr()
    config = ServerConfig(models=args.models, feast_repo=args.feast_repo, host=args.host, port=args.port,
                          default_model=args.default_model, metrics_port=args.metrics_port, poll_s=args.poll_s,
                          torch_threads=args.torch_threads, workers=args.workers, processes=args.processes,
                          tls_cert=args.tls_cert,
                          tls_key=args.tls_key, auth_token=_token(args.auth_token_file),
                          scoring=ScoringConfig(max_candidates=args.max_candidates,
                                                batch_candidates=args.batch_candidates,
                                                utc_offset_hours=args.utc_offset_hours))

    def ready(port, server, metrics_ports):
        urls = " ".join(f"http://{args.host}:{p}/metrics" for p in metrics_ports)
        print(f"serving on {args.host}:{port}; models: {', '.join(server.repository.names()) or 'none yet'}; "
              f"processes: {args.processes}; metrics on {urls}", flush=True)

    asyncio.run(serve(config, ready))
    return 0


def _token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise CommandError(f"cannot read the token file: {e}") from None
    if not token:
        raise CommandError(f"the token file {path} is empty")
    return token


def _channel(args: argparse.Namespace):
    import grpc

    if args.tls_ca is None:
        return grpc.insecure_channel(args.addr)
    try:
        return grpc.secure_channel(args.addr, grpc.ssl_channel_credentials(args.tls_ca.read_bytes()))
    except OSError as e:
        raise CommandError(f"cannot read --tls-ca: {e}") from None


def _cmd_score(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from serving.pb import ctr_scoring_pb2 as pb
    from serving.pb import ctr_scoring_pb2_grpc as pb_grpc

    if (args.request is None) == (args.replay is None):
        raise CommandError("give one of --request FILE or --replay FEAT")
    if args.request is not None:
        try:
            requests = [(json_format.Parse(args.request.read_text(), pb.ScoreRequest()), None)]
        except (OSError, json_format.ParseError) as e:
            raise CommandError(f"cannot read a ScoreRequest from {args.request}: {e}") from None
    else:
        from serving.replay import logged_requests

        requests = [(r.request, r.labels) for r in logged_requests(args.replay, args.split, args.requests)]
        if not requests:
            raise CommandError(f"no {args.split} requests under {args.replay}")
    token = _token(args.auth_token_file)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with _channel(args) as channel:
        if args.wait:
            _wait_until_serving(channel, args.wait)
        stub = pb_grpc.CtrScoringStub(channel)
        for request, labels in requests:
            if args.model:
                request.model_name = args.model
            try:
                response = stub.Score(request, timeout=args.timeout, metadata=metadata)
            except grpc.RpcError as e:
                raise CommandError(f"{e.code().name}: {e.details()}") from None
            if labels is None:
                print(json_format.MessageToJson(response, indent=2))
            else:
                _print_replayed(request, response, labels)
    return 0


def _wait_until_serving(channel, seconds: float) -> None:
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + seconds
    while True:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise CommandError(f"the server was not serving within {seconds:g} s")
        time.sleep(0.2)


def _print_replayed(request, response, labels: list[int]) -> None:
    when = dt.datetime.fromtimestamp(request.context.ts_ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    flags = [f for f in ("cold_start_user", "degraded_features") if getattr(response, f)]
    print(f"user {request.user_id} at {when}, {request.context.geohash[:6]}: {response.model_name}/"
          f"{response.model_version}, {response.timing.total_ms:.1f} ms (features {response.timing.features_ms:.1f}, "
          f"model {response.timing.model_ms:.1f}){' ' + ', '.join(flags) if flags else ''}")
    for c, s, label in zip(request.candidates, response.scores, labels):
        print(f"  item {c.item_id:>7}  shop {c.shop_id:>5}  bid {c.bid:5.2f}  pCTR {s.pctr:.4f}  eCPM {s.ecpm:7.2f}"
              f"  {'clicked' if label else ''}")


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    # the configs' own defaults are the CLI's defaults
    from features.validate import ValidationConfig
    from fin.promotion import PromotionGate
    from fin.revenue import ReplayConfig
    from jobs.features_config import FeaturesConfig
    from serving.config import ServerConfig

    parser = argparse.ArgumentParser(prog="fin", description="FIN ads ranking system: simulate, validate and "
                                     "convert food-ordering ad logs, build features, train, evaluate and serve models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate a city's food-ordering ad logs",
                       description="Simulate users, shops and ads of a city and write contract log tables "
                                   "(partitioned parquet) and a manifest. Deterministic for a seed.")
    p.add_argument("--out", required=True, type=Path, help="output log folder")
    p.add_argument("--config", type=Path, help="YAML/JSON simulator config (any subset of keys; see configs/)")
    p.add_argument("--seed", type=int, help="random seed (default 7)")
    p.add_argument("--users", type=int, help="number of users (default 2000)")
    p.add_argument("--days", type=int, help="number of days (default 120)")
    p.add_argument("--start-date", help="first local date, YYYY-MM-DD (default 2026-03-02)")
    p.add_argument("--chunk-users", type=int, help="users simulated together; bounds memory (default 4000)")
    p.add_argument("--workers", type=int, help="processes simulating chunks in parallel (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--report", action="store_true", help="print the signal properties measured on the output")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("validate", help="check a log folder against the data contract",
                       description="Check every table of a log folder against the data contract. Bad rows go to "
                                   "OUT/quarantine/<table>.parquet with a reason; counts go to OUT/validation.json. "
                                   f"Exits {EXIT_VALIDATION_FAILED} when a table's bad fraction passes the threshold.")
    p.add_argument("--logs", required=True, type=Path, help="log folder to check")
    p.add_argument("--out", type=Path, help="where quarantine/ and validation.json go (default: --logs)")
    p.add_argument("--max-bad-fraction", type=float, default=ValidationConfig.max_bad_fraction,
                   help=f"per-table threshold (default {ValidationConfig.max_bad_fraction})")
    p.add_argument("--window-start", type=_time_ms, help="earliest valid timestamp (ms or ISO; default: manifest)")
    p.add_argument("--window-end", type=_time_ms, help="first invalid timestamp (ms or ISO; default: manifest)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("features", help="build timelines, training examples and the Feast store (a Ray job)",
                       description="Turn a log folder into per-user timelines, point-in-time training examples "
                                   "split by day, item/shop statistics, and a Feast repository whose online store "
                                   "holds each user's last --max-seq-len events. Runs on a local Ray unless "
                                   "--ray-address is given.")
    p.add_argument("--logs", required=True, type=Path, help="log folder (contract tables, parquet)")
    p.add_argument("--out", required=True, type=Path, help="output folder (data/ is replaced, feast/ is kept)")
    d = FeaturesConfig()
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help=f"events per user in the online store (default {d.max_seq_len})")
    p.add_argument("--partitions", type=int, default=d.partitions,
                   help=f"user partitions, one build task each (default {d.partitions})")
    p.add_argument("--validation-days", type=int, default=d.validation_days,
                   help=f"days before the test days (default {d.validation_days})")
    p.add_argument("--test-days", type=int, default=d.test_days, help=f"last days of the data (default {d.test_days})")
    p.add_argument("--max-bad-fraction", type=float, default=d.max_bad_fraction,
                   help=f"fail above this bad-row share (default {d.max_bad_fraction})")
    p.add_argument("--ray-address", help="existing Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--online-store", choices=["sqlite", "redis"], default=d.online_store, help="Feast online store")
    p.add_argument("--redis", default=d.redis_connection, help=f"Redis host:port for --online-store redis (default {d.redis_connection})")
    p.add_argument("--no-materialize", action="store_true", help="apply the Feast repository but skip materialising")
    p.set_defaults(func=_cmd_features)

    p = sub.add_parser("train", help="train FIN or a baseline with TorchRec; write a model artifact",
                       description="Train a model on the features job's output with DistributedModelParallel "
                                   "(gloo on CPU, NCCL on GPU), checkpoint every epoch (a rerun resumes), stop "
                                   "early on validation AUC, and write MODELS/<name>/<version>/ (safetensors "
                                   "weights, configs, metrics, checksum). Under torchrun each process is one "
                                   "worker (the way to a cluster).")
    p.add_argument("--data", required=True, type=Path, help="the output folder of fin features (or its data/ folder)")
    p.add_argument("--out", required=True, type=Path, help="model repository folder (MODELS)")
    p.add_argument("--model", help="model kind: fin, din, sim or dnn (default fin)")
    p.add_argument("--name", help="artifact name (default: the model kind)")
    p.add_argument("--config", type=Path, help="YAML/JSON training config (any subset; see configs/train.yaml)")
    p.add_argument("--workers", type=int, help="local worker processes (default 1)")
    p.add_argument("--epochs", type=int, help="maximum epochs")
    p.add_argument("--batch-size", type=int, help="global batch size (split over workers)")
    p.add_argument("--max-steps", type=int, help="steps per epoch (default 600; 0: the whole train split)")
    p.add_argument("--max-seq-len", type=int, help="history events read per example")
    p.add_argument("--lr", type=float, help="dense learning rate (Adam)")
    p.add_argument("--sparse-lr", type=float, help="table learning rate (row-wise Adagrad)")
    p.add_argument("--patience", type=int, help="epochs without a better validation AUC before stopping")
    p.add_argument("--sharding", help="table sharding: table_wise (default), row_wise or auto (the planner's choice)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--init-from", type=Path,
                   help="start from this artifact's weights (MODELS/NAME/VERSION of the same model and config)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="compare model artifacts on a split: AUC, GAUC, calibration, RPM replay",
                       description="Score a split of the features job's output with each model artifact and "
                                   "report AUC, GAUC, logloss, calibration, AUC by meal slot and by city, and the "
                                   "simulator's oracle ceiling when the data has it; when the logs had every ad "
                                   "candidate (ad_candidates), also each model's RPM and CTR replayed under an "
                                   "auction against the logging policy (markdown + JSON).")
    p.add_argument("--data", required=True, type=Path, help="the output folder of fin features (or its data/ folder)")
    p.add_argument("--models", required=True, nargs="+",
                   help="artifacts: version folders (MODELS/fin/3), model folders (newest version) or, with "
                        "--repo, name[/version]")
    p.add_argument("--repo", type=Path, help="model repository for name[/version] specs")
    p.add_argument("--out", required=True, type=Path, help="report folder (report.md, report.json)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="default test")
    p.add_argument("--auction", default="gsp", choices=["gsp", "first_price"],
                   help="revenue replay: price rule (default gsp, generalised second price)")
    p.add_argument("--slots", type=int, help="revenue replay: ads per request (default: the logging policy's)")
    p.add_argument("--reserve", type=float, default=0.0, help="revenue replay: least price per click (default 0)")
    p.add_argument("--bootstrap", type=int, default=ReplayConfig.bootstrap,
                   help=f"revenue replay: bootstrap resamples for the intervals (default {ReplayConfig.bootstrap})")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("serve", help="serve CTR scoring and model endpoints over gRPC, with hot model reload",
                       description="Start the gRPC server: the CTR scoring API (fin_ads.v1.CtrScoring), the "
                                   "Open Inference Protocol (inference.GRPCInferenceService, KServe v2) for "
                                   "vision and other models, grpc.health.v1 health checking (NOT_SERVING until "
                                   "a model loads), reflection, and Prometheus metrics. Models come from the "
                                   "repository folder, which is watched for new versions; a version that fails "
                                   "to load or its smoke check is refused and the serving one stays. Stops on "
                                   "SIGTERM/SIGINT after draining calls.")
    p.add_argument("--models", required=True, type=Path, help="model repository folder (MODELS)")
    p.add_argument("--feast-repo", required=True, type=Path, help="the Feast repository (FEAT/feast of fin features)")
    sd = ServerConfig(models=Path(), feast_repo=Path())
    p.add_argument("--host", default=sd.host, help=f"address to listen on (default {sd.host})")
    p.add_argument("--port", type=int, default=sd.port, help=f"port (default {sd.port}; 0: any free port)")
    p.add_argument("--default-model", default=sd.default_model,
                   help=f"model for requests that name none (default {sd.default_model}; else the only model loaded)")
    p.add_argument("--metrics-port", type=int, default=sd.metrics_port,
                   help=f"Prometheus /metrics port on --host (default {sd.metrics_port}: any free port, printed)")
    p.add_argument("--max-candidates", type=int, default=sd.scoring.max_candidates,
                   help=f"largest candidate list accepted (default {sd.scoring.max_candidates})")
    p.add_argument("--batch-candidates", type=int, default=sd.scoring.batch_candidates,
                   help="requests waiting together share one forward up to this many candidates "
                        f"(default {sd.scoring.batch_candidates}; 1: one request per forward)")
    p.add_argument("--utc-offset-hours", type=float, default=sd.scoring.utc_offset_hours,
                   help=f"local time of the city (default {sd.scoring.utc_offset_hours:g})")
    p.add_argument("--poll-s", type=float, default=sd.poll_s,
                   help=f"seconds between model repository scans (default {sd.poll_s:g})")
    p.add_argument("--torch-threads", type=int, default=sd.torch_threads,
                   help=f"intra-op threads per forward (default {sd.torch_threads})")
    p.add_argument("--workers", type=int, default=sd.workers, help=f"forwards (and store reads) that may run at once (default {sd.workers})")
    p.add_argument("--processes", type=int, default=sd.processes,
                   help=f"server processes sharing the port (default {sd.processes}); one Python process uses "
                        "about one core, so give one per core for throughput")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate (chain): serve TLS instead of plaintext")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--auth-token-file", type=Path,
                   help="file holding a token: calls must send `authorization: Bearer <token>` (health excepted)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("promote", help="make a model version the serving default (optionally through the gate)",
                       description="Writes MODELS/NAME/PROMOTED: requests that pin no version get this version "
                                   "once a server has loaded it (running servers pick it up at their next "
                                   "repository scan; a version that fails to load leaves the default as it was). "
                                   "With --report (a fin evaluate report.json holding this version and the "
                                   "current default), only when the version is not worse than the default by "
                                   "more than the tolerances in AUC and SNIPS RPM; the decision and its reasons "
                                   "are printed and written to promotion.json beside the report.")
    p.add_argument("--models", required=True, type=Path, help="model repository folder (MODELS)")
    p.add_argument("--name", required=True, help="model name (MODELS/NAME)")
    p.add_argument("--version", required=True, type=int, help="version to promote (MODELS/NAME/VERSION)")
    p.add_argument("--report", type=Path, help="gate on this evaluation report.json")
    gate = PromotionGate()
    p.add_argument("--auc-tolerance", type=float, default=gate.auc_tolerance,
                   help=f"AUC the version may lose against the default (default {gate.auc_tolerance})")
    p.add_argument("--rpm-tolerance", type=float, default=gate.rpm_tolerance,
                   help=f"share of SNIPS RPM it may lose (default {gate.rpm_tolerance})")
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("schedule", help="run the daily features -> train -> evaluate -> promote chain",
                       description="Runs the scheduled jobs of a schedule file (configs/jobs.yaml): each data "
                                   "date's features, train, evaluate and promote, by cron expression and "
                                   "dependency, with retries and backoff; run state in a sqlite database. "
                                   "--once runs what is due and exits (for cron or an external orchestrator).")
    p.add_argument("--config", required=True, type=Path, help="schedule YAML (see configs/jobs.yaml)")
    p.add_argument("--once", action="store_true", help="run what is due now, then exit (1 if a run failed for good)")
    p.add_argument("--poll-s", type=float, default=60.0, help="seconds between checks when not --once (default 60)")
    p.set_defaults(func=_cmd_schedule)

    p = sub.add_parser("runs", help="list the scheduled runs and their status",
                       description="Prints the run history of a schedule's database as a markdown table.")
    p.add_argument("--config", required=True, type=Path, help="schedule YAML (see configs/jobs.yaml)")
    p.set_defaults(func=_cmd_runs)

    p = sub.add_parser("score", help="send ScoreRequests to a server and print the responses",
                       description="A small client of the CTR scoring API: sends one ScoreRequest written in "
                                   "the protobuf JSON mapping (proto/serving/pb/ctr_scoring.proto), or replays "
                                   "logged requests of a split of the features job's output.")
    p.add_argument("--addr", default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)")
    p.add_argument("--request", type=Path, help="a ScoreRequest as JSON; the response is printed as JSON")
    p.add_argument("--replay", type=Path, help="the features job's output: replay its logged requests")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="with --replay (default test)")
    p.add_argument("--requests", type=int, default=3, help="with --replay: how many (default 3)")
    p.add_argument("--model", help="model name to ask for (default: the request's, else the server's default)")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline per call in seconds (default 5)")
    p.add_argument("--wait", type=float, default=0, help="first wait up to this many seconds for the server to serve")
    p.add_argument("--tls-ca", type=Path, help="PEM certificate to trust: connect with TLS")
    p.add_argument("--auth-token-file", type=Path, help="file holding the server's bearer token")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("convert-eleme", help="convert the public Ele.me CTR dataset CSV into contract logs",
                       description="Map the Ele.me CTR dataset layout (one impression per row, per-request "
                                   "history lists) into contract tables: rows become impressions, their history "
                                   "lists become de-duplicated behaviours, and the world tables are derived. "
                                   "Malformed rows go to OUT/quarantine/eleme_rows.parquet with a reason.")
    p.add_argument("--csv", required=True, type=Path, help="dataset CSV file (with header)")
    p.add_argument("--out", required=True, type=Path, help="output log folder")
    p.add_argument("--timediff-unit", choices=["s", "min", "ms"], default="s",
                   help="unit of timediff_list (default s)")
    p.add_argument("--utc-offset-hours", type=float, default=8.0, help="local time of the data (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_convert_eleme)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("train", "evaluate", "serve"):
        from fin.quiet import quiet_library_notices

        quiet_library_notices()
    try:
        return args.func(args)
    except CommandError as e:
        print(f"fin {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"fin {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for the user; the traceback on request
        if os.environ.get("FIN_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"fin {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
