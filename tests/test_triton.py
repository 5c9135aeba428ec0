from vae_rt.triton import model_config, write_model_repository


def test_config_names_platform_shapes_batching_and_gpu():
    text = model_config("vae_decoder", "tensorrt_plan", 2, 784, 4096)
    assert 'platform: "tensorrt_plan"' in text and "max_batch_size: 4096" in text
    assert '{ name: "z" data_type: TYPE_FP32 dims: [ 2 ] }' in text
    assert '{ name: "image" data_type: TYPE_FP32 dims: [ 784 ] }' in text
    assert "preferred_batch_size: [ 1024 ]" in text  # 8192 exceeds max_batch_size
    assert "kind: KIND_GPU" in text and "dynamic_batching" in text
    assert "kind: KIND_AUTO" in model_config("vae_decoder", "onnxruntime_onnx", 2, 784, 4096)  # a CPU-only Triton loads it


def test_repository_layout(tmp_path, random_checkpoint):
    from vae_rt.export import export_onnx

    onnx_path = export_onnx(random_checkpoint, tmp_path / "export", "fp32").path
    cpu_repo = write_model_repository(tmp_path / "cpu", onnx_path, None, 65536)
    assert sorted(p.name for p in cpu_repo.iterdir()) == ["vae_decoder"]  # the name `vae-rt serve` answers to
    assert (cpu_repo / "vae_decoder" / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    assert 'platform: "onnxruntime_onnx"' in (cpu_repo / "vae_decoder" / "config.pbtxt").read_text()

    plan = tmp_path / "fake.plan"
    plan.write_bytes(b"plan bytes")
    repo = write_model_repository(tmp_path / "repo", onnx_path, plan, 65536)
    assert sorted(p.name for p in repo.iterdir()) == ["vae_decoder", "vae_decoder_onnx"]
    assert (repo / "vae_decoder" / "1" / "model.plan").read_bytes() == b"plan bytes"
    assert 'name: "vae_decoder"' in (repo / "vae_decoder" / "config.pbtxt").read_text()
    assert (repo / "vae_decoder_onnx" / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    assert 'platform: "onnxruntime_onnx"' in (repo / "vae_decoder_onnx" / "config.pbtxt").read_text()
