"""Training one run: its config, the optimizer, the compiled step programs, the loop with Orbax
resume, the workdir's files, telemetry, frozen parameters, and exports of a trained run."""
