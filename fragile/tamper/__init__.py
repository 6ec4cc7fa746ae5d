"""The tamper wing: every attack on a copy of the watermarked model, from fine-tuning to a single bit, and the
experiments built on them (the benign matrix, the method comparison), with the watermark tracked throughout.
One file per attack or family of one idea; fragile.tamper.registry names them all; fragile.tamper.records
builds and reads every results record."""
