"""The machinery that runs the methods, written once and shared by all of them.

  driver      the sequential block-by-block driver: capture a block's inputs, run the blocks
              one at a time (prefetching the next), the dense block outputs, the window stream
  training    the one training step and the one window-training loop (Elsa, masked
              fine-tuning, PERP), float32 masters, the bf16 rule, budgets
  admm        the ADMM engine (z, u, projections, low-bit state)
  adam8bit    Adam with 8-bit moments
  gram        the input statistics (running means of ||X_j||^2 and H = 2 X^T X / n) and the
              damped inverse-Hessian factor of SparseGPT's and GPTQ's sweeps
  grid        the b-bit quantization grid (quant/ and SparseGPT's joint sweep)
  shard       DDP / FSDP2 placement and the collectives around it
  checkpoint  resumable training checkpoints (torch.distributed.checkpoint)

May import: torch, the package's foundations (errors, registry, sparsity, masks, models,
data). Never a method (pruners/, recover/), evaluation/ or records/: those import this.
"""
