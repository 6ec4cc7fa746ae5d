"""The watermark itself: secret keys, 8-bit triggers on disk, where they live beside a checkpoint,
black-box verification, the benign jitter that calibrates near-boundary triggers, and the trigger methods."""
