"""Prefect front end of the zipper pipeline: `flows.pipeline.zipper_pipeline` calls the same stage
functions as `dvc.yaml` (zipper.stages); `zipper flow run|serve` drive it from the command line."""
