"""ONNX: export a bundle (:mod:`.export`), the conversion used at scoring time
(:mod:`.convert`), and a torch-free scorer of exports (:mod:`.runtime`).

Imports nothing, so ``mspray.onnx.runtime`` stays usable without torch.
"""
