"""Single-device DeepSeek-V3 modules: no process groups, no FP8 switches, no rank checks.
Parallelism and FP8 are applied from outside by swapping or wrapping these modules."""
