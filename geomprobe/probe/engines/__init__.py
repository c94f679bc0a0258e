"""The two per-sample gradient engines behind :func:`geomprobe.probe.per_sample_grads`.

- :mod:`~geomprobe.probe.engines.vmap`: ``torch.func.vmap(grad_and_value(loss))`` over
  ``functional_call``; works for any model.
- :mod:`~geomprobe.probe.engines.layerwise`: one batched forward and one backward to the outputs
  of the modules owning the selected parameters, per-sample weight gradients in closed form.

Both fill a caller's (B, P) float32 buffer and (B,) loss buffer chunk by chunk.
"""
