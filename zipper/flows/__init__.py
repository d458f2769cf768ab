"""Prefect front end of the zipper pipeline: `zipper.flows.pipeline.zipper_pipeline` calls the same stage
functions as `dvc.yaml` (zipper.stages), cached by the same stage graph (zipper.graph: keys in `cache`);
`zipper flow run|serve` drive it from the command line."""
