"""Write the evaluation images into data/eval.zarr.

The data root comes from the config, not from params: where the data lives is not what it is,
so moving it (or forgetting --config data_root=...) reruns nothing."""

from saliency_robustness.data import build_eval_dataset
from saliency_robustness.runtime import script_main
from saliency_robustness.stores import provenance, write_store

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    ds = build_eval_dataset(sm.params.dataset, sm.config["data_root"])
    ds.attrs.update(provenance(sm.params.dataset))
    write_store(ds, sm.output[0])
