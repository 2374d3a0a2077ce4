"""The gRPC server (grpc.aio): CTR scoring for the ad server, the Open Inference Protocol for generic model
endpoints (serving.inference_protocol), health checking, reflection, and Prometheus metrics.

Per Score request: validate (INVALID_ARGUMENT with the field and the reason), pick the model (NOT_FOUND
when it is not loaded), read the user's features (one timeline read, cached; see serving.online), cut
fragments and run one batched forward for all candidates, shared with the other requests waiting at
that moment (serving.batching). The blocking parts (store reads, forwards) run on small thread pools
with a fixed torch intra-op thread count, so the event loop keeps accepting calls. A request whose
deadline has passed is answered DEADLINE_EXCEEDED, never late. Health is NOT_SERVING until a model has
loaded; the repository is polled for new versions while serving; on SIGTERM/SIGINT health goes
NOT_SERVING and in-flight calls drain before the process exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hmac
import logging
import signal
import sys
import time

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from features.item_embeddings import EMBEDDING, ItemEmbeddings
from features.realtime import open_realtime, realtime_location
from fin.artifact import Artifact
from serving.batching import ForwardBatcher, model_forward, score_forward
from serving.config import ServerConfig
from serving.creatives import BadCreative, CreativeEmbeddings, RequestCreatives
from serving.inference_protocol import InferenceService
from serving.ingest_worker import IngestSettings, IngestUnavailable, IngestWorker
from serving.metrics import ServingMetrics
from serving.online import OnlineFeatures
from serving.pb import ctr_scoring_pb2 as pb
from serving.pb import ctr_scoring_pb2_grpc as pb_grpc
from serving.pb import inference_v2_pb2
from serving.pb import inference_v2_pb2_grpc as inference_pb2_grpc
from serving.repository import Change, ModelNotFound, ModelRepository
from serving.scoring import BadRequest, ecpm, request_inputs, scores_wire
from serving.vision import VisionModel

log = logging.getLogger("fin.serving")
SCORING_SERVICE = pb.DESCRIPTOR.services_by_name["CtrScoring"].full_name
HEALTH_PREFIX = "/grpc.health.v1.Health/"
INFERENCE_SERVICE = inference_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class CtrScoring(pb_grpc.CtrScoringServicer):
    def __init__(self, repository: ModelRepository, features: OnlineFeatures, config: ServerConfig,
                 batcher: ForwardBatcher, metrics: ServingMetrics, ingester: IngestWorker | None,
                 creatives: CreativeEmbeddings | None = None):
        self.repository, self.features, self.config = repository, features, config
        self.batcher, self.metrics, self.ingester = batcher, metrics, ingester
        self.creatives = creatives

    def _encoder(self, width: int) -> VisionModel | None:
        """The creative encoder loaded from the repository whose embeddings are `width` wide, the model's (None
        when there is none: another version's width would be refused as the client's error; the candidates
        without a stored embedding are then scored without one, and the response says so)."""
        try:
            model = self.repository.get(self.config.creative_encoder)
        except ModelNotFound:
            return None
        if not (isinstance(model, VisionModel) and model.meta.get("model") == "creative_encoder"):
            return None
        widths = [spec.shape[-1] for spec in model.outputs if spec.name == EMBEDDING]
        return model if widths == [width] else None

    async def _creatives(self, request: pb.ScoreRequest, inputs, timeline, width: int,
                         degraded: bool) -> RequestCreatives:
        """The request's creative embeddings (`serving.creatives`), read and embedded on a store thread; while
        the store is down (the request's features were `degraded`), from the cache alone; if the store cannot
        be read, none (every candidate scored without an image and said so)."""
        items = inputs.candidates["item_id"]
        history = timeline["item_id"] if timeline is not None else np.zeros(0, np.int64)
        pngs = [c.creative_png for c in request.candidates]
        try:
            return await asyncio.wait_for(asyncio.to_thread(
                self.creatives.for_request, items, pngs, history, width, self._encoder(width), not degraded),
                self.config.online.read_timeout_s + 1.0)
        except BadCreative as e:  # a creative that is not a PNG of the encoder's size
            raise BadRequest(str(e)) from None
        except Exception:  # noqa: BLE001 - a store failure or timeout scores without images
            return RequestCreatives(ItemEmbeddings.of(np.zeros(0, np.int64), np.zeros((0, width), np.float32)),
                                    np.zeros(0, np.int32), np.arange(len(items), dtype=np.int32))

    async def Ingest(self, request: pb.IngestRequest, context: grpc.aio.ServicerContext) -> pb.IngestResponse:
        if self.ingester is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this server keeps no behaviour log (fin serve --behaviour-log LOGS): an ingested "
                                "event would miss the next features run")
        n, limit = len(request.events), self.config.online.ingest_max_events
        if n == 0 or n > limit:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"an Ingest call takes 1 to {limit} events, this one has {n}")
        try:
            response = pb.IngestResponse.FromString(await self.ingester.ingest(request.SerializeToString()))
        except IngestUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if response.accepted == 0:
            shown = "; ".join(f"events[{r.index}]: {r.reason}" for r in response.refused[:5])
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"every event was refused: {shown}")
        return response

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        started = time.perf_counter()
        self.metrics.candidates.observe(len(request.candidates))
        try:
            inputs = request_inputs(request, self.config.scoring)
            artifact = self.repository.get(request.model_name or None,
                                           request.model_version if request.HasField("model_version") else None)
        except BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ModelNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        if not isinstance(artifact, Artifact):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{artifact.name} is not a CTR model: call it through inference.GRPCInferenceService")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before scoring")

        t = time.perf_counter()
        features = await self.features.read(inputs.user_id, inputs.candidates)
        t_features = time.perf_counter()
        scored = inputs.with_features(features.timeline, features.stats)
        creatives = None
        if artifact.model.config.image_dim:
            try:
                creatives = await self._creatives(request, inputs, features.timeline, artifact.model.config.image_dim,
                                                  features.degraded)
            except BadRequest as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            scored = dataclasses.replace(scored, images=creatives.embeddings)
        if artifact.package is not None and artifact.package.takes(scored):
            # on the event loop: the compiled call holds the interpreter lock throughout (nothing of this
            # process runs beside it on a forward thread), so a hand-off there and back would only add to it
            pctr = artifact.package.pctr(scored)
            self.metrics.forward_requests.observe(1)
        else:
            pctr = await asyncio.wrap_future(self.batcher.submit(artifact, scored))
        features_s, model_s = t_features - t, time.perf_counter() - t_features
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while scoring")
        values = ecpm(pctr, inputs.bids)
        if features.degraded:
            self.metrics.degraded.inc()
        else:
            self.metrics.cache.labels("timeline", "hit" if features.timeline_cached else "miss").inc()
            self.metrics.cache.labels("stats", "hit").inc(features.stats_hits)
            self.metrics.cache.labels("stats", "miss").inc(features.stats_misses)
            if features.timeline is None:
                self.metrics.cold_start.inc()
        response = pb.ScoreResponse(
            model_name=artifact.name, model_version=artifact.version,
            cold_start_user=features.timeline is None and not features.degraded,
            degraded_features=features.degraded,
            timing=pb.Timing(total_ms=(time.perf_counter() - started) * 1000, features_ms=features_s * 1000,
                             model_ms=model_s * 1000))
        if creatives is not None:
            response.creatives_embedded.extend(creatives.embedded.tolist())
            response.creatives_missing.extend(creatives.missing.tolist())
        response.MergeFromString(scores_wire(pctr, values))
        return response


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Every call: with a token configured, a call without `authorization: Bearer <token>` gets
    UNAUTHENTICATED (health checks stay open for probes). Every unary call: a request that is not a valid
    message gets INVALID_ARGUMENT (grpc.aio would answer UNKNOWN), and the call is counted by method and
    status code, and timed."""

    def __init__(self, metrics: ServingMetrics, token: str | None = None):
        self.metrics = metrics
        self.expected = f"Bearer {token}" if token else None

    def _authorized(self, details) -> bool:
        if self.expected is None or details.method.startswith(HEALTH_PREFIX):
            return True
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        return hmac.compare_digest(given.encode(), self.expected.encode())

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is not None and not self._authorized(details):
            return _refusal(handler, self.metrics, details.method.rsplit("/", 1)[-1])
        if handler is None or handler.unary_unary is None:
            return handler
        method, inner, metrics = details.method.rsplit("/", 1)[-1], handler.unary_unary, self.metrics
        deserialize = handler.request_deserializer

        async def counted(raw: bytes, context):
            started, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                try:
                    request = deserialize(raw) if deserialize else raw
                except Exception:  # noqa: BLE001 - any decoding failure is the caller's malformed message
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {method} request message")
                return await inner(request, context)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:  # the client went away or its deadline passed
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                metrics.requests.labels(method, code.name).inc()
                metrics.latency.labels(method).observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(counted, response_serializer=handler.response_serializer)


def _refusal(handler, metrics: ServingMetrics, method: str):
    """A handler of the same kind as `handler` that refuses the call as UNAUTHENTICATED."""
    async def refuse(request, context):
        metrics.requests.labels(method, grpc.StatusCode.UNAUTHENTICATED.name).inc()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


class Server:
    """A running server: `await start()`, then `await wait()` or `await stop()`."""

    def __init__(self, config: ServerConfig, store=None):
        from feast import FeatureStore

        self.config = config
        torch.set_num_threads(config.torch_threads)
        self.repository = ModelRepository(config.models, default_model=config.default_model, compiled=config.compiled)
        store = store or FeatureStore(repo_path=str(config.feast_repo))
        self.realtime = open_realtime(store, config.feast_repo, config.online.realtime_max_events)
        self.features = OnlineFeatures(store, config.online, threads=config.workers, realtime=self.realtime)
        self.ingester = None if config.behaviour_log is None else IngestWorker(IngestSettings(
            log_folder=config.behaviour_log, realtime=realtime_location(store, config.feast_repo),
            realtime_max_events=config.online.realtime_max_events,
            utc_offset_hours=config.scoring.utc_offset_hours, priority=config.online.ingest_priority))
        self.metrics = ServingMetrics()
        self.batcher = ForwardBatcher(config.workers, score_forward(config.scoring.batch_candidates),
                                      self.metrics.forward_requests.observe)
        self.infer_batcher = ForwardBatcher(config.workers, model_forward(config.infer_batch),  # ModelInfer
                                            self.metrics.infer_requests.observe)
        self.metrics_port = 0
        self.health = health.aio.HealthServicer()
        # SO_REUSEPORT (explicit: serve() may start more processes on this port)
        self.server = grpc.aio.server(interceptors=[CallInterceptor(self.metrics, config.auth_token)],
                                      options=[("grpc.so_reuseport", 1)])
        self.port = 0
        self._poller: asyncio.Task | None = None

    async def start(self) -> int:
        pb_grpc.add_CtrScoringServicer_to_server(
            CtrScoring(self.repository, self.features, self.config, self.batcher, self.metrics, self.ingester,
                       CreativeEmbeddings(self.features.store, self.config.creatives)),
            self.server)
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(self.repository, self.infer_batcher, self.metrics), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        services = (SCORING_SERVICE, INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self.server)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert:
            credentials = grpc.ssl_server_credentials([(self.config.tls_key.read_bytes(),
                                                        self.config.tls_cert.read_bytes())])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}")
        if self.ingester is not None:
            await self.ingester.start()
        try:
            await asyncio.to_thread(self.features.warm_up)
        except Exception as e:  # noqa: BLE001 - serving starts anyway; requests are flagged degraded meanwhile
            log.warning("online store not readable at start (%s): requests are scored degraded until it is", e)
        await self._set_health()
        self.batcher.start()
        self.infer_batcher.start()
        self.metrics_port = self.metrics.serve_http(self.config.host, self.config.metrics_port)
        await self.server.start()
        await self.refresh()
        # The ~500k objects of the libraries, the feature store and the models live as long as the process:
        # frozen, the cyclic garbage collector no longer walks them (a full pass took ~360 ms, a stall
        # that every request in flight would wait out).
        gc.collect()
        gc.freeze()
        self._poller = asyncio.create_task(self._poll())
        return self.port

    async def refresh(self) -> list[Change]:
        changes = await asyncio.to_thread(self.repository.refresh)
        for change in changes:
            if change.action == "refused":
                self.metrics.reload_failures.labels(change.name).inc()
            elif change.action == "loaded":
                model = self.repository.get(change.name, change.version)
                if isinstance(model, Artifact):
                    self.metrics.model_compiled.labels(change.name, str(change.version)).set(model.package is not None)
        for name in self.repository.names():
            self.metrics.model_version.labels(name).set(self.repository.get(name).version)
        await self._set_health()
        return changes

    async def _set_health(self) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if self.repository.names()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", SCORING_SERVICE):
            await self.health.set(service, status)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a failed scan is logged; serving goes on
                log.exception("model repository scan failed")

    async def stop(self) -> None:
        """Health goes NOT_SERVING (load balancers stop sending) while calls are still taken for
        `drain_delay_s`: calls already on the wire are started, not cancelled. Then no new calls, and the
        ones in flight get up to `grace_s` to finish."""
        if self._poller:
            self._poller.cancel()
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(self.config.drain_delay_s)
        await self.server.stop(self.config.grace_s)
        self.infer_batcher.close()
        self.batcher.close()
        self.features.close()
        self.realtime.close()
        if self.ingester is not None:
            await self.ingester.close()  # it answers what it holds and flushes the behaviour log
        self.metrics.close()
        self.repository.close()
        gc.unfreeze()  # (frozen at start) so that what only a cycle holds is collected, packages included
        gc.collect()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def log_to_stderr() -> None:
    """The server's own log lines on stderr (libraries may already have configured the root logger)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("fin")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


async def serve(config: ServerConfig, ready=None) -> None:
    """Run until SIGTERM or SIGINT, then drain and exit. With `config.processes` > 1, the other processes
    are started on the same port once this one listens (see `_start_processes`) and stopped with it.
    `ready(port, server, metrics_ports)` is called when every process serves (metrics_ports: this process's
    first)."""
    server = Server(config)
    port = await server.start()
    others = await asyncio.to_thread(
        _start_processes, dataclasses.replace(config, port=port, processes=1, metrics_port=0), config.processes - 1)
    if ready:
        ready(port, server, [server.metrics_port, *(metrics_port for _, metrics_port in others)])
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down: not serving; calls in flight get up to %.0f s", config.drain_delay_s + config.grace_s)
    for process, _ in others:
        process.terminate()  # SIGTERM: each drains as this one does
    await server.stop()
    for process, _ in others:
        await asyncio.to_thread(process.join)


def _start_processes(config: ServerConfig, count: int) -> list:
    """`count` more server processes listening on `config.port` beside this one (SO_REUSEPORT: the kernel
    spreads connections over them), so forwards run on more cores than one Python process can use. Each
    has its own feature caches and metrics port. Returns (process, metrics port) once all serve."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or event loop
    started = []
    for i in range(count):
        receive, send = context.Pipe(duplex=False)
        # not daemonic: each starts its own ingest worker process (stopped by `serve` all the same)
        process = context.Process(target=_serve_process, args=(config, send), name=f"fin-serve-{i + 2}")
        process.start()
        started.append((process, receive))
    ready = []
    for process, receive in started:
        if not receive.poll(600) or (metrics_port := receive.recv()) is None:
            for p, _ in started:
                p.kill()
            raise RuntimeError(f"server process {process.name} did not start (see its log above)")
        log.info("%s (pid %d) serving on port %d", process.name, process.pid, config.port)
        ready.append((process, metrics_port))
    return ready


def _serve_process(config: ServerConfig, ready_pipe) -> None:
    from fin.quiet import quiet_library_notices

    quiet_library_notices()
    log_to_stderr()
    try:
        asyncio.run(serve(config, lambda port, server, metrics_ports: ready_pipe.send(server.metrics_port)))
    except BaseException:
        ready_pipe.send(None)
        raise
