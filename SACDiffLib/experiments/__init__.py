"""Experiments on top of the method: evaluation (real cases, MedSeg slices), the ablation, the label-free choice of
settings (validate), the benchmark, synthetic phantoms and the demo. They import the method and the drivers; nothing
below them imports them (only ``cli``)."""
