"""Co-design analyzer: what a model costs on given hardware, from first principles.

hardware (catalog of accelerators and links) -> costs (parameters, KV cache, FLOPs, training
memory) -> limits (expert-parallel decode limit, decode roofline, MFU) and network (topologies,
node-limited routing traffic) -> report (tables vs the paper, JSON, plots) -> cli (`dsv3 analyze`).
"""
