"""Training on the FX form: fake quantization, distillation (KD, reverse KL, BiLD), L0 gates."""
