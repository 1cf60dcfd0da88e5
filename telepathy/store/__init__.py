"""The torch half of the checkpoint store: training state to files and back. Safe part files (:mod:`.formats`),
content-addressed blobs (:mod:`.blobs`), what a checkpoint holds (:mod:`.contents`), host snapshots for async
saves, DCP shards, and the all-ranks commit (:mod:`.collective`); :class:`.checkpoint_store.CheckpointStore` ties
them to one save dir."""
