"""The runtimes an ``Engine`` runs a model on, one module each, imported only when chosen.

    ort        ONNX Runtime (the default), with its cpu, openvino, cuda and tensorrt providers
    openvino   the OpenVINO runtime, reading an IR (model.xml + model.bin) or model.onnx
    litert     LiteRT (ai-edge-litert), reading model.tflite

Each opens one model file and offers the same small surface to ``engine.Engine``: the input
and output names, the metadata the file carries (if any), ``run(batch)`` from uint8
``[N, H, W, C]`` pixels to float32 ``[N, classes]``, and ``describe()``.

Importing this package imports none of them.
"""
