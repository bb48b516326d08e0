"""Multi-process tests: launch presets and the CLI's relaunch, FSDP2 (through a test-only shim on CPU), DeepSpeed,
and the reference log-prob cache across processes."""
