"""Scale-out on torch.distributed: expert parallelism, FSDP2, pipeline parallelism, EPLB.

DeepSeek-V3 trains without tensor parallelism: experts are spread over ranks (expert parallelism,
with FP8 dispatch and node-limited routing), dense parts are sharded ZeRO-style (FSDP2), and layers
are split into pipeline stages (DualPipe). Everything here runs on CPU with the gloo backend too.
"""
