"""Performance accounting: model FLOPs of a step and memory plans compiled from shapes.

`flops` counts what a LoRA step must compute and the matmuls of a traced program;
`memory_plan` compiles the train step from abstract shapes for fake devices and reads
XLA's buffer assignment back. `python -m emo_jax.perf` is the memory-plan command.
"""
