"""The run: the command line (`usage`, `cli`, `parser`), checkpoints and exact resume (`callbacks`, `resume`), the
run directory (`rundir`) and the samples logged while training (`generations`)."""
