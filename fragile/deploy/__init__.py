"""Deployments: what a model computes where it runs (torch in fp32 / fp16 / bf16, ONNX Runtime, OpenVINO), the
ONNX artifact a deployment ships (export, and the weights it really holds), and the runtimes they need."""
