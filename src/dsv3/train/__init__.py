"""Training: data (corpus, tokenizer, token cache, loader), optimizer and schedules, the training
loop, atomic checkpoints with exact resume, metrics and the `dsv3 train` / `dsv3 generate` commands."""
