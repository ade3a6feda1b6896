"""One file per pipeline stage; each `run(ctx) -> outputs` turns typed settings into calls to the rooms below.

Every stage is a child MLflow run of the pipeline's parent run; its outputs hold the "paths" that must exist
for the stage to count as finished."""
