"""The pipeline's stages, one module each (`python -m cmt_bench STAGE` runs `stages/<STAGE>.py`'s
`run`). Each reads params, its inputs under artifacts/, and writes its outputs (weights, shards,
`run.json` with the MLflow run id and ledger) for the next stage. A stage's DVC dependencies are the
package modules it imports (`cmt_bench.codedeps`), so keeping stages apart keeps them precise."""
