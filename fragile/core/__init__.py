"""What every stage shares: command-line plumbing, devices, safe checkpoint I/O, datasets on the device,
training loops, the weights as one vector, torchrun, and results files."""
