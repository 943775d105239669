"""The split client: bottom and top run locally, the trunk on a slm_trio server.

`open_split_client` connects, describes the trunk, loads the local parts and returns a
`SplitClient` for generation (streamed or not, greedy or sampled, batched) and single
forward or backward passes. `open_management_client` loads, unloads, lists and describes
models, and checks the server's health. Both work from trio and asyncio code.
"""

from slm_trio.client._generation import TokenStream
from slm_trio.client._management import (
    ManagementClient,
    ModelDescription,
    ModelStatus,
    open_management_client,
)
from slm_trio.client._results import (
    ForwardResult,
    GenerationResult,
    GenerationStats,
    StepTiming,
    TokenStep,
    TrunkResult,
)
from slm_trio.client._retry import RetryPolicy, is_retryable
from slm_trio.client._sampling import SamplingConfig
from slm_trio.client._split import Prompt, SplitClient, open_split_client
from slm_trio.client._transport import (
    GrpcTrunkTransport,
    RemoteModel,
    TrunkReply,
    TrunkSession,
    TrunkTransport,
)

__all__ = [
    "ForwardResult",
    "GenerationResult",
    "GenerationStats",
    "GrpcTrunkTransport",
    "ManagementClient",
    "ModelDescription",
    "ModelStatus",
    "Prompt",
    "RemoteModel",
    "RetryPolicy",
    "SamplingConfig",
    "SplitClient",
    "StepTiming",
    "TokenStep",
    "TokenStream",
    "TrunkReply",
    "TrunkResult",
    "TrunkSession",
    "TrunkTransport",
    "is_retryable",
    "open_management_client",
    "open_split_client",
]
