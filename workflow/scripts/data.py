"""Write the evaluation images into data/eval.zarr."""

from saliency_robustness.data import build_eval_dataset
from saliency_robustness.runtime import script_main
from saliency_robustness.stores import provenance, write_store

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    ds = build_eval_dataset(sm.params.dataset, sm.params.data_root)
    ds.attrs.update(provenance(sm.params.dataset))
    write_store(ds, sm.output[0])
