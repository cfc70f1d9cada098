"""Fine-grained FP8 mixed precision (DeepSeek-V3 sec. 3.3) and the LogFMT codec (ISCA 2025 sec. 3.2).

Import the submodules directly (``from dsv3.fp8.linear import convert_to_fp8``); nothing here is
imported by ``import dsv3``, so the model never depends on FP8.
"""
