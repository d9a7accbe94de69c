from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "grammar")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    presence_penalty: float
    frequency_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    logprobs: bool
    top_logprobs: int
    grammar: str
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., grammar: _Optional[str] = ...) -> None: ...

class NodeProfile(_message.Message):
    __slots__ = ("node_id", "roles", "engine", "device", "tflops", "mem_bw_gbps", "free_mem_bytes", "version", "grpc_address", "kv_port", "key_fingerprint", "hardware", "profile_source", "prefill_probe")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TFLOPS_FIELD_NUMBER: _ClassVar[int]
    MEM_BW_GBPS_FIELD_NUMBER: _ClassVar[int]
    FREE_MEM_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_PORT_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PROBE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    engine: str
    device: str
    tflops: float
    mem_bw_gbps: float
    free_mem_bytes: int
    version: str
    grpc_address: str
    kv_port: int
    key_fingerprint: str
    hardware: str
    profile_source: str
    prefill_probe: _containers.RepeatedCompositeFieldContainer[PrefillProbe]
    def __init__(self, node_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., engine: _Optional[str] = ..., device: _Optional[str] = ..., tflops: _Optional[float] = ..., mem_bw_gbps: _Optional[float] = ..., free_mem_bytes: _Optional[int] = ..., version: _Optional[str] = ..., grpc_address: _Optional[str] = ..., kv_port: _Optional[int] = ..., key_fingerprint: _Optional[str] = ..., hardware: _Optional[str] = ..., profile_source: _Optional[str] = ..., prefill_probe: _Optional[_Iterable[_Union[PrefillProbe, _Mapping]]] = ...) -> None: ...

class PrefillProbe(_message.Message):
    __slots__ = ("tokens", "seconds")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    seconds: float
    def __init__(self, tokens: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "fingerprint", "model_type", "num_layers", "kv_heads", "head_dim", "dtype", "vocab_size", "max_position_embeddings", "eos_token_ids", "tokenizer_json", "chat_template", "bos_token", "eos_token", "config_json")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    fingerprint: str
    model_type: str
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokenizer_json: str
    chat_template: str
    bos_token: str
    eos_token: str
    config_json: str
    def __init__(self, model_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., model_type: _Optional[str] = ..., num_layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_position_embeddings: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., tokenizer_json: _Optional[str] = ..., chat_template: _Optional[str] = ..., bos_token: _Optional[str] = ..., eos_token: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("node", "model")
    NODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    node: NodeProfile
    model: ModelInfo
    def __init__(self, node: _Optional[_Union[NodeProfile, _Mapping]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("ok", "active_requests", "active_leases", "reserved_kv_bytes", "draining")
    OK_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    active_requests: int
    active_leases: int
    reserved_kv_bytes: int
    draining: bool
    def __init__(self, ok: _Optional[bool] = ..., active_requests: _Optional[int] = ..., active_leases: _Optional[int] = ..., reserved_kv_bytes: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("drain", "timeout_s")
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    drain: bool
    timeout_s: float
    def __init__(self, drain: _Optional[bool] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("draining", "active_requests")
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    active_requests: int
    def __init__(self, draining: _Optional[bool] = ..., active_requests: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "kv_host", "kv_port", "transfer_token", "chunk_size", "codec", "skip_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    KV_HOST_FIELD_NUMBER: _ClassVar[int]
    KV_PORT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SKIP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    kv_host: str
    kv_port: int
    transfer_token: bytes
    chunk_size: int
    codec: str
    skip_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., kv_host: _Optional[str] = ..., kv_port: _Optional[int] = ..., transfer_token: _Optional[bytes] = ..., chunk_size: _Optional[int] = ..., codec: _Optional[str] = ..., skip_tokens: _Optional[int] = ...) -> None: ...

class PrefillReply(_message.Message):
    __slots__ = ("first_token", "queue_s", "prefill_s", "kv_bytes", "send_s", "cached_tokens", "prefix_blocks")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEND_S_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    queue_s: float
    prefill_s: float
    kv_bytes: int
    send_s: float
    cached_tokens: int
    prefix_blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, first_token: _Optional[int] = ..., queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., kv_bytes: _Optional[int] = ..., send_s: _Optional[float] = ..., cached_tokens: _Optional[int] = ..., prefix_blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "local_prefill", "lease_s", "codec", "first_step")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    local_prefill: bool
    lease_s: float
    codec: str
    first_step: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., local_prefill: _Optional[bool] = ..., lease_s: _Optional[float] = ..., codec: _Optional[str] = ..., first_step: _Optional[int] = ...) -> None: ...

class Reserved(_message.Message):
    __slots__ = ("kv_host", "kv_port", "transfer_token", "reserved_kv_bytes", "cached_tokens")
    KV_HOST_FIELD_NUMBER: _ClassVar[int]
    KV_PORT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESERVED_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    kv_host: str
    kv_port: int
    transfer_token: bytes
    reserved_kv_bytes: int
    cached_tokens: int
    def __init__(self, kv_host: _Optional[str] = ..., kv_port: _Optional[int] = ..., transfer_token: _Optional[bytes] = ..., reserved_kv_bytes: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("token_id", "index", "logprob", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    index: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., index: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_s", "prefill_s", "kv_bytes", "transfer_s", "exposed_transfer_s", "decode_s", "prompt_tokens", "completion_tokens", "cached_tokens", "decode_cached_tokens")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    EXPOSED_TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    prefill_s: float
    kv_bytes: int
    transfer_s: float
    exposed_transfer_s: float
    decode_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    decode_cached_tokens: int
    def __init__(self, queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., kv_bytes: _Optional[int] = ..., transfer_s: _Optional[float] = ..., exposed_transfer_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., decode_cached_tokens: _Optional[int] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("finish_reason", "timings", "prefix_blocks")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    timings: Timings
    prefix_blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, finish_reason: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., prefix_blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeEvent(_message.Message):
    __slots__ = ("reserved", "token", "done")
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    reserved: Reserved
    token: Token
    done: Done
    def __init__(self, reserved: _Optional[_Union[Reserved, _Mapping]] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("requests_total", "requests_failed", "requests_cancelled", "kv_bytes_sent", "kv_bytes_received", "leases_expired", "active_requests", "active_leases", "reserved_kv_bytes", "tokens_generated", "prefix_blocks", "prefix_block_tokens", "prefix_cache_bytes", "prefix_cache_capacity_bytes", "prefix_hits", "prefix_hit_tokens", "running_requests", "kv_cache_usage_perc")
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    LEASES_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_PERC_FIELD_NUMBER: _ClassVar[int]
    requests_total: int
    requests_failed: int
    requests_cancelled: int
    kv_bytes_sent: int
    kv_bytes_received: int
    leases_expired: int
    active_requests: int
    active_leases: int
    reserved_kv_bytes: int
    tokens_generated: int
    prefix_blocks: _containers.RepeatedScalarFieldContainer[int]
    prefix_block_tokens: int
    prefix_cache_bytes: int
    prefix_cache_capacity_bytes: int
    prefix_hits: int
    prefix_hit_tokens: int
    running_requests: int
    kv_cache_usage_perc: float
    def __init__(self, requests_total: _Optional[int] = ..., requests_failed: _Optional[int] = ..., requests_cancelled: _Optional[int] = ..., kv_bytes_sent: _Optional[int] = ..., kv_bytes_received: _Optional[int] = ..., leases_expired: _Optional[int] = ..., active_requests: _Optional[int] = ..., active_leases: _Optional[int] = ..., reserved_kv_bytes: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., prefix_blocks: _Optional[_Iterable[int]] = ..., prefix_block_tokens: _Optional[int] = ..., prefix_cache_bytes: _Optional[int] = ..., prefix_cache_capacity_bytes: _Optional[int] = ..., prefix_hits: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., running_requests: _Optional[int] = ..., kv_cache_usage_perc: _Optional[float] = ...) -> None: ...

class ProbeLinkRequest(_message.Message):
    __slots__ = ("kv_host", "kv_port", "payload_bytes", "pings", "timeout_s")
    KV_HOST_FIELD_NUMBER: _ClassVar[int]
    KV_PORT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINGS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    kv_host: str
    kv_port: int
    payload_bytes: int
    pings: int
    timeout_s: float
    def __init__(self, kv_host: _Optional[str] = ..., kv_port: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., pings: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ProbeLinkReply(_message.Message):
    __slots__ = ("gbps", "latency_s", "payload_bytes", "payload_s")
    GBPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_S_FIELD_NUMBER: _ClassVar[int]
    gbps: float
    latency_s: float
    payload_bytes: int
    payload_s: float
    def __init__(self, gbps: _Optional[float] = ..., latency_s: _Optional[float] = ..., payload_bytes: _Optional[int] = ..., payload_s: _Optional[float] = ...) -> None: ...
