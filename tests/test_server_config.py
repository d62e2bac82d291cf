"""The server's configuration tree: flat flags and GAN_* variables, nested sections, one place for defaults."""

from __future__ import annotations

import pytest

from service.config import ServerConfig, comments, flags, parse

# The flags users and deployments already use: the tree may be reshaped, these names may not change.
FLAGS = [
    "model_repository",
    "host",
    "port",
    "http_port",
    "metrics_port",
    "max_batch_size",
    "preferred_batch_size",
    "max_delay_ms",
    "max_queue",
    "batch_workers",
    "batching",
    "providers",
    "provider_options",
    "cuda_graph",
    "tensorrt_cache",
    "intra_op_threads",
    "inter_op_threads",
    "allow_spinning",
    "max_images",
    "max_stream_images",
    "stream_chunk",
    "max_message_bytes",
    "encoder_threads",
    "grace_seconds",
    "max_connection_age_s",
    "max_connection_age_grace_s",
]


def test_flags_override_environment_which_overrides_defaults():
    env = {"GAN_PORT": "6000", "GAN_MAX_BATCH_SIZE": "32", "GAN_BATCHING": "false", "GAN_GRACE_SECONDS": "3"}
    cfg = parse(["--max-batch-size", "16", "--batch-workers", "3"], environ=env)
    assert (cfg.port, cfg.batching.max_batch_size, cfg.batching.enabled, cfg.batching.workers) == (6000, 16, False, 3)
    assert cfg.lifecycle.grace_seconds == 3
    assert parse([], environ={}) == ServerConfig()
    with pytest.raises(SystemExit, match="GAN_BATCHING"):
        parse([], environ={"GAN_BATCHING": "maybe"})


def test_every_existing_flag_and_variable_keeps_its_name(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"], environ={})
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert f"--{flag.replace('_', '-')}" in text and f"GAN_{flag.upper()}" in text, flag
    # Each flag lands in its section.
    cfg = ServerConfig.from_flags(max_delay_ms=7, intra_op_threads=3, stream_chunk=9, max_connection_age_s=4)
    assert (cfg.batching.max_delay_ms, cfg.runtime.intra_op_threads) == (7, 3)
    assert (cfg.limits.stream_chunk, cfg.lifecycle.max_connection_age_s) == (9, 4)
    with pytest.raises(TypeError, match="max_dealy_ms"):
        ServerConfig.from_flags(max_dealy_ms=7)


# The defaults as documented in the README (and, before the tree, the flat ServerConfig's): every default the
# server runs with, read through its command line. Any section that grew a default of its own would show here.
DEFAULTS = {
    "model_repository": "models", "host": "[::]", "port": 50051, "http_port": 8000, "metrics_port": 9090, "max_batch_size": 128,
    "preferred_batch_size": 0, "max_delay_ms": 2.0, "max_queue": 8192, "batch_workers": 0, "batching": True, "adaptive_delay": True,
    "profile_cache": "auto", "workers": 1,
    "providers": "auto", "provider_options": "", "cuda_graph": False, "tensorrt_cache": "", "intra_op_threads": 1, "inter_op_threads": 1, "allow_spinning": False, "max_images": 1024,
    "max_stream_images": 65536, "stream_chunk": 64, "max_message_bytes": 64 << 20, "encoder_threads": 2,
    "response_cache_bytes": 0,
    "grace_seconds": 25.0, "max_connection_age_s": 0.0, "max_connection_age_grace_s": 30.0, "metrics_host": "",
    "health_port": -1, "tls_cert": "", "tls_key": "", "tls_client_ca": "", "auth_tokens_file": "", "reflection": True,
    "full_metadata": False, "model_control": "none", "poll_seconds": 10.0, "load_model": (), "version_policy": "latest:1",
    "admin_api": "auto", "reuse_grpc_port": False, "max_json_bytes": 8 << 20, "http_deadline_s": 60.0,
    "header_timeout_s": 10.0, "s3_endpoint": "", "s3_region": "", "model_cache": "auto", "max_model_bytes": 2 << 30,
}  # fmt: skip


def test_every_default_is_the_documented_one():
    cfg = parse([], environ={})
    assert set(flags()) == set(DEFAULTS)
    values = {
        **{f: getattr(cfg, f) for f in (
            "model_repository", "host", "port", "http_port", "metrics_port", "metrics_host", "health_port",
            "reuse_grpc_port", "workers")},
        "max_batch_size": cfg.batching.max_batch_size, "max_delay_ms": cfg.batching.max_delay_ms,
        "max_queue": cfg.batching.max_queue, "batch_workers": cfg.batching.workers, "batching": cfg.batching.enabled,
        "adaptive_delay": cfg.batching.adaptive, "preferred_batch_size": cfg.batching.preferred_batch_size,
        "profile_cache": cfg.batching.profile_cache,
        **{f: getattr(cfg.runtime, f) for f in (
            "providers", "provider_options", "cuda_graph", "tensorrt_cache", "intra_op_threads", "inter_op_threads",
            "allow_spinning")},
        **{f: getattr(cfg.limits, f) for f in (
            "max_images", "max_stream_images", "stream_chunk", "max_message_bytes", "encoder_threads", "max_json_bytes",
            "http_deadline_s", "response_cache_bytes")},
        **{f: getattr(cfg.lifecycle, f) for f in (
            "grace_seconds", "max_connection_age_s", "max_connection_age_grace_s", "header_timeout_s")},
        **{f: getattr(cfg.security, f) for f in (
            "tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file", "reflection", "full_metadata", "admin_api")},
        "model_control": cfg.models.mode, "poll_seconds": cfg.models.poll_seconds, "load_model": cfg.models.load_model,
        "version_policy": cfg.models.version_policy,
        **{f: getattr(cfg.store, f) for f in ("s3_endpoint", "s3_region", "model_cache", "max_model_bytes")},
    }  # fmt: skip
    assert values == DEFAULTS


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--max-batch-size", "0"], "max_batch_size"),
        (["--batch-workers", "-1"], "batch_workers"),
        (["--provider-options", "CUDAExecutionProvider:device_id"], "provider_options"),
        (["--preferred-batch-size", "256"], "preferred_batch_size"),
        (["--max-delay-ms", "-1"], "max_delay_ms"),
        (["--max-delay-ms", "inf"], "max_delay_ms"),
        (["--intra-op-threads", "-1"], "intra_op_threads"),
        (["--stream-chunk", "0"], "stream_chunk"),
        (["--max-message-bytes", "0"], "max_message_bytes"),
        (["--grace-seconds", "-2"], "grace_seconds"),
        (["--max-queue", "10"], "max_queue"),  # below max_images
        (["--port", "70000"], "port"),
        (["--health-port", "-2"], "health_port"),
        (["--port", "6000", "--health-port", "6000"], "port"),
        (["--tls-cert", "a.pem"], "tls_cert"),  # without its key
        (["--model-control", "sometimes"], "model_control"),
        (["--admin-api", "yes"], "admin_api"),
        (["--poll-seconds", "0"], "poll_seconds"),
        (["--version-policy", "latest:0"], "version_policy"),
        (["--version-policy", "specific:"], "version_policy"),
        (["--version-policy", "newest"], "version_policy"),
        (["--load-model", "a"], "load_model"),  # not in explicit mode
        (["--model-control", "explicit", "--load-model", "../etc"], "load_model"),
        (["--tls-client-ca", "ca.pem"], "tls_client_ca"),  # mutual TLS without a server certificate
        (["--max-json-bytes", "0"], "max_json_bytes"),
        (["--max-message-bytes", "1000", "--max-json-bytes", "1001"], "max_json_bytes"),  # over the binary limit
        (["--http-deadline-s", "-1"], "http_deadline_s"),
        (["--header-timeout-s", "0"], "header_timeout_s"),  # no limit would let slow clients hold connections
    ],
)
def test_bad_values_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        parse(argv, environ={})
    assert f"error: {flag}:" in capsys.readouterr().err


def test_the_http_and_port_settings_come_from_flags_and_variables():
    env = {
        "GAN_MAX_JSON_BYTES": "1000",
        "GAN_HTTP_DEADLINE_S": "2.5",
        "GAN_HEADER_TIMEOUT_S": "3",
        "GAN_REUSE_GRPC_PORT": "1",
    }
    cfg = parse([], environ=env)
    assert (cfg.limits.max_json_bytes, cfg.limits.http_deadline_s, cfg.lifecycle.header_timeout_s) == (1000, 2.5, 3)
    assert cfg.reuse_grpc_port
    flags_ = ["--max-json-bytes", "2000", "--http-deadline-s", "0", "--header-timeout-s", "4", "--no-reuse-grpc-port"]
    cfg = parse(flags_, environ=env)
    assert (cfg.limits.max_json_bytes, cfg.limits.http_deadline_s, cfg.lifecycle.header_timeout_s) == (2000, 0, 4)
    assert not cfg.reuse_grpc_port
    assert parse(["--reuse-grpc-port"], environ={}).reuse_grpc_port
    # Left at its default, the JSON limit follows a smaller message limit rather than refuse it.
    assert parse(["--max-message-bytes", "4096"], environ={}).limits.max_json_bytes == 4096


def test_help_says_what_every_flag_does_from_its_comment(capsys):
    """`python -m service --help` describes each flag with its comment in service/config.py, where its default is."""
    said = comments()
    assert all(said.values()), [flag for flag, text in said.items() if not text]
    with pytest.raises(SystemExit) as done:
        parse(["--help"], environ={})
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert done.value.code == 0
    assert "poll mode: the time between two rescans. env GAN_POLL_SECONDS (default 10.0)" in out
    assert "none: what the repository holds at start; poll: rescan every poll_seconds; explicit:" in out
