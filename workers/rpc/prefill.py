"""The ``Prefill`` RPC: prefill here and push the KV, layer by layer, to a decode node.

1. Connect to the decode node's KV port and pass the cluster-key handshake,
   presenting the transfer token from its ``reserved`` event (off the loop).
2. On the engine thread, prefill in chunks; each layer's slice goes to a
   ``KVPusher`` the moment the engine emits it, so it is on the wire while
   later layers compute. Sample the first token and send ``end`` with it and
   the prefill timings (``prefill_s``, ``prefill_end_wall``, ``queue_s``).
3. Reply once the last byte has left. The prefill cache is released as soon
   as the transfer ends, whatever ended it.

A cancel (the ``Cancel`` RPC, or the caller going away) stops the engine at
its next slice and sends ``abort`` to the decode node.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from concurrent.futures import Future

import grpc
from grpc import aio

from cluster.auth import AuthError
from proto import pdcluster_pb2 as pb
from workers.kv.listener import KVPushError, KVPusher, open_kv_connection
from workers.engines.sampling import SamplingParams, sample
from workers.rpc.state import (
    ActiveRequest,
    Cancelled,
    RPCFailure,
    WorkerState,
    cancellable,
    sampling_from_proto,
)

log = logging.getLogger(__name__)


class PrefillRPC:
    """Serves ``Prefill`` calls over one worker's state."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state

    async def __call__(self, request: pb.PrefillRequest, context: aio.ServicerContext) -> pb.PrefillReply:
        state = self.state
        arrival = time.monotonic()
        state.counters.requests_total += 1
        active: ActiveRequest | None = None
        job: Future | None = None
        try:
            prompt, params, chunk_size = self._check(request)
            active = state.open(request.request_id, "prefill")
            sock = await self._connect(request)
            pusher = active.pusher = KVPusher(
                sock, threaded=state.settings.threaded_send, max_queued_bytes=state.settings.max_queued_bytes,
                timeout=state.settings.send_timeout_s)
            job = state.engines.submit(self._job, active, prompt, params, chunk_size, arrival)
            first, queue_s, prefill_s = await asyncio.wrap_future(job)
            await asyncio.wait_for(asyncio.wrap_future(pusher.done), timeout=state.settings.send_timeout_s)
            state.counters.kv_bytes_sent += pusher.bytes_sent
            return pb.PrefillReply(first_token=first, queue_s=queue_s, prefill_s=prefill_s,
                                   kv_bytes=pusher.bytes_sent, send_s=pusher.send_s)
        except asyncio.CancelledError:  # the caller went away or its deadline passed
            state.counters.requests_cancelled += 1
            raise
        except Exception as e:
            failure = _failure(e, request, cancelled=active is not None and active.cancelled.is_set())
            state.count_failure(failure.code)
            if failure.code == grpc.StatusCode.INTERNAL:
                log.exception("request %s: prefill failed", request.request_id)
            await context.abort(failure.code, failure.message)
        finally:
            if active is not None:
                active.cancelled.set()  # a job still running stops at its next slice
                if active.pusher is not None:
                    active.pusher.close()
                    active.pusher.sock.close()
                state.retire(active, job)

    def _check(self, request: pb.PrefillRequest) -> tuple[list[int], SamplingParams, int]:
        state = self.state
        if not state.settings.can_prefill:
            raise RPCFailure(grpc.StatusCode.FAILED_PRECONDITION, "this worker does not have the prefill role")
        state.check_codec(request.codec)
        if not request.kv_host or not 0 < request.kv_port < 65536 or not request.transfer_token:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             "kv_host, kv_port and transfer_token (from the decode node's reserved event) are required")
        prompt = state.check_prompt(request.request_id, request.prompt_token_ids)
        return prompt, sampling_from_proto(request.sampling), request.chunk_size or state.settings.chunk_size

    async def _connect(self, request: pb.PrefillRequest) -> socket.socket:
        """A KV connection to the decode node that passed the handshake."""
        opening = asyncio.get_running_loop().run_in_executor(
            None, lambda: open_kv_connection(request.kv_host, request.kv_port, self.state.key,
                                             request.transfer_token, timeout=self.state.settings.connect_timeout_s))
        try:
            return await opening
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise
        except AuthError as e:
            raise RPCFailure(grpc.StatusCode.UNAUTHENTICATED,
                             f"decode node {request.kv_host}:{request.kv_port} refused the KV connection: {e}") from None
        except OSError as e:
            raise RPCFailure(grpc.StatusCode.UNAVAILABLE,
                             f"cannot reach decode node KV port {request.kv_host}:{request.kv_port}: {e}") from None

    def _job(self, active: ActiveRequest, prompt: list[int], params: SamplingParams, chunk_size: int,
             arrival: float) -> tuple[int, float, float]:
        """On the engine thread: prefill, streaming each slice as it is computed."""
        started = time.monotonic()
        engines, pusher = self.state.engines, active.pusher
        assert pusher is not None
        try:
            pusher.begin(active.request_id, engines.engine.kv_layout(len(prompt)))
            result = engines.engine.prefill(active.cache_key, prompt, cancellable(active, pusher.send_slice),
                                            chunk_size)
            first = sample(result.logits, params, 0)
            pusher.end(first, {"prefill_s": result.compute_s, "prefill_end_wall": time.time(),
                               "queue_s": started - arrival})
            return first, started - arrival, result.compute_s
        except BaseException as e:
            pusher.abort(f"prefill failed on the prefill node: {type(e).__name__}: {e}")
            raise
        finally:
            engines.engine.release(active.cache_key)


def _failure(error: BaseException, request: pb.PrefillRequest, *, cancelled: bool) -> RPCFailure:
    if isinstance(error, RPCFailure):
        return error
    if cancelled or isinstance(error, Cancelled):
        return RPCFailure(grpc.StatusCode.CANCELLED, "request cancelled")
    if isinstance(error, (KVPushError, OSError, TimeoutError, asyncio.TimeoutError)):
        return RPCFailure(grpc.StatusCode.UNAVAILABLE,
                          f"KV stream to {request.kv_host}:{request.kv_port} broke: {error}")
    return RPCFailure(grpc.StatusCode.INTERNAL, f"prefill failed: {type(error).__name__}: {error}")


def _close_opened(opening: asyncio.Future) -> None:
    """A connection that finished opening after its caller gave up."""
    if not opening.cancelled() and opening.exception() is None:
        with contextlib.suppress(OSError):
            opening.result().close()
