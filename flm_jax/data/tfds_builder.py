"""A tensorflow-datasets builder for the embedded corpus, and `prepare_tfds` to write it into a local data_dir.

    data_dir = prepare_tfds("/tmp/tfds")                      # offline: reads the committed snapshot
    register_tfds_task("my_prose", "flm_corpus/prose:1.0.0", data_dir=data_dir)

Once prepared, seqio.TfdsDataSource / tfds.load read the folder with no network and no builder code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

# isort: split  (TensorFlow's settings in flm_jax.data._tf apply before seqio / tfds import it)
import tensorflow_datasets as tfds  # noqa: E402
from etils import epath  # noqa: E402

from flm_jax.data import corpus
from flm_jax.data._tf import tf  # noqa: F401  (TF settings before tfds imports it)

TFDS_NAME = "flm_corpus"
TFDS_VERSION = "1.0.0"


class FlmCorpus(tfds.core.GeneratorBasedBuilder):
    """The flm_jax default corpus; one config per domain, features {'id', 'text'}, splits train/validation."""

    VERSION = tfds.core.Version(TFDS_VERSION)
    RELEASE_NOTES = {TFDS_VERSION: "The committed snapshot of flm_jax/data/assets."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=d, description=f"the '{d}' domain") for d in corpus.DOMAINS]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds's default probes `importlib_resources`, a backport that is not part of our stack.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="King James Bible chapters (prose) and CPython stdlib sources (code), from flm_jax.",
            features=tfds.features.FeaturesDict({"id": tfds.features.Text(), "text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the snapshot ships with the package
        return {split: self._generate_examples(split) for split in corpus.SPLITS}

    def _generate_examples(self, split: str):
        for doc in corpus.load_documents(self.builder_config.name, split):
            yield doc.id, {"id": doc.id, "text": doc.text}


def tfds_name(domain: str) -> str:
    """The full TFDS name of a domain's dataset, e.g. 'flm_corpus/prose:1.0.0'."""
    return f"{TFDS_NAME}/{domain}:{TFDS_VERSION}"


def prepare_tfds(data_dir: str, domains: Sequence[str] = corpus.DOMAINS) -> str:
    """Prepares the corpus domains as TFDS datasets under `data_dir` (no-op where already done); returns it."""
    data_dir = os.path.abspath(data_dir)
    config = tfds.download.DownloadConfig(try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP)
    for domain in domains:
        FlmCorpus(config=domain, data_dir=data_dir).download_and_prepare(download_config=config)
    return data_dir
