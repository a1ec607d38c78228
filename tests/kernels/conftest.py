import os

# Triton kernels run in Triton's CPU interpreter here (fp32; bf16 is wrong in the interpreter).
# It is chosen when a kernel is defined, so before sora_dist.kernels.triton_kernels is imported.
os.environ["TRITON_INTERPRET"] = "1"
