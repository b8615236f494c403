"""`brewnet extract_features`: Caffe's tools/extract_features, with Caffe's arguments.

The net (TEST phase, with its own data layer) runs NUM_MINI_BATCHES forward passes; each
sample's values of each named blob become one record of its dataset: in LMDB/LevelDB a
Datum (float_data; channels, height and width the blob's axes 1-3, as Caffe writes them)
under the key "%010d" of the sample's index; in HDF5 a row of the dataset named after the
blob (N x the blob's own axes), written as it goes. A dataset appears under its name only
once complete.
"""

import logging
import os
import sys

import click
import numpy

from brewnet.netdef.errors import DefinitionError

log = logging.getLogger("brewnet.extract_features")
DB_TYPES = ("lmdb", "leveldb", "hdf5")


class _DatumSink:
    def __init__(self, path, backend, overwrite):
        from brewnet.layers.dataio.db import DBWriter

        self.writer = DBWriter(path, backend, overwrite=overwrite)

    def add(self, rows):
        from brewnet.netdef import caffe_pb2

        for row in rows:
            legacy = row.shape + (1,) * (3 - row.ndim) if row.ndim <= 3 else None
            datum = caffe_pb2.Datum()
            if legacy is not None:
                datum.channels, datum.height, datum.width = (int(d) for d in legacy)
            else:  # Caffe's Datum has three axes: fold the rest into the width
                datum.channels, datum.height, datum.width = row.shape[0], row.shape[1], int(numpy.prod(row.shape[2:]))
            datum.float_data.extend(row.astype(numpy.float32).ravel().tolist())
            self.writer.put(b"%010d" % self.writer.count, datum.SerializeToString())

    def close(self):
        self.writer.close()

    def abort(self):
        self.writer.abort()


class _HDF5Sink:
    def __init__(self, path, blob, overwrite):
        import h5py

        if os.path.lexists(path) and not overwrite:
            raise DefinitionError(f"{path} already exists (use --overwrite to replace it)")
        self.path, self.blob = path, blob
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        self.file = h5py.File(self.tmp, "w")
        self.data = None

    def add(self, rows):
        if self.data is None:
            self.data = self.file.create_dataset(self.blob, shape=(0,) + rows.shape[1:], dtype="float32",
                                                 maxshape=(None,) + rows.shape[1:], chunks=True)
        start = self.data.shape[0]
        self.data.resize(start + rows.shape[0], axis=0)
        self.data[start:] = rows.astype(numpy.float32)

    def close(self):
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.file.close()
        os.unlink(self.tmp)


def _rows(blob, blob_array):
    """A blob's values as one row per sample (a 1-axis blob is one value per sample)."""
    array = numpy.asarray(blob_array, dtype=numpy.float32)
    if array.ndim == 0:
        raise DefinitionError(f"blob {blob!r} is a scalar, not one value per sample")
    return array.reshape(array.shape[0], 1) if array.ndim == 1 else array


@click.command("extract_features")
@click.argument("pretrained_net_param", metavar="WEIGHTS")
@click.argument("feature_extraction_proto_file", metavar="NET")
@click.argument("blob_names", metavar="BLOB[,BLOB2...]")
@click.argument("dataset_names", metavar="DATASET[,DATASET2...]")
@click.argument("num_mini_batches", type=click.IntRange(min=1))
@click.argument("db_type", type=click.Choice(DB_TYPES, case_sensitive=False))
@click.argument("device", required=False, default="CPU", type=click.Choice(["CPU", "GPU"], case_sensitive=False))
@click.argument("device_id", required=False, default=0, type=click.IntRange(min=0))
@click.option("--overwrite", is_flag=True, help="Replace existing datasets.")
def extract_features(pretrained_net_param, feature_extraction_proto_file, blob_names, dataset_names,
                     num_mini_batches, db_type, device, device_id, overwrite):
    """Save the values of blobs of a net, sample by sample, for a data set.

    As Caffe's extract_features: WEIGHTS (.caffemodel, .h5 or zoo:NAME) are copied into
    NET (built in the TEST phase; its data layer gives the data), which runs
    NUM_MINI_BATCHES forward passes; the values of each BLOB go to the DATASET of the
    same position (one per blob), as DB_TYPE: lmdb or leveldb (Datums with float_data
    under keys "%010d", as Caffe) or hdf5 (a dataset named after the blob).
    Then CPU (default) or GPU and its DEVICE_ID.
    """
    from brewnet.api import resolve_model, resolve_weights
    from brewnet.layers.kernels import backend
    from brewnet.layers.kernels.backend import to_numpy
    from brewnet.layers.net import Net
    from brewnet.netdef import caffe_pb2
    from brewnet.solver.log import setup_logging

    setup_logging(stream=sys.stderr)
    blobs = [b for b in blob_names.split(",")]
    datasets = [d for d in dataset_names.split(",")]
    if len(blobs) != len(datasets) or not all(blobs) or not all(datasets):
        raise DefinitionError(f"give one dataset name per blob name ({len(blobs)} blob(s), {len(datasets)} "
                              f"dataset(s)), none empty")
    if device.upper() == "GPU":
        backend.set_mode_gpu()
        backend.set_device(device_id)
        log.info("Using GPU %d", device_id)
    else:
        backend.set_mode_cpu()
        log.info("Using CPU")
    model = resolve_model(feature_extraction_proto_file)
    if not os.path.isfile(model):
        raise DefinitionError("net file not found", model)
    net = Net(model, phase=caffe_pb2.TEST, source=model)
    net.copy_trained_layers_from(resolve_weights(pretrained_net_param))
    missing = [b for b in blobs if b not in net.blobs]
    if missing:
        raise DefinitionError(f"unknown feature blob name {missing[0]!r} in the network (blobs: "
                              f"{', '.join(net.blobs)})", model)
    db_type = db_type.lower()
    sinks = []
    try:
        for blob, dataset in zip(blobs, datasets):
            log.info("Opening dataset %s", dataset)
            sinks.append(_HDF5Sink(dataset, blob, overwrite) if db_type == "hdf5"
                         else _DatumSink(dataset, db_type, overwrite))
        log.info("Extracting Features")
        counts = [0] * len(blobs)
        for _ in range(num_mini_batches):
            net.forward()
            for i, (blob, sink) in enumerate(zip(blobs, sinks)):
                rows = _rows(blob, to_numpy(net.blobs[blob].data))
                sink.add(rows)
                before, counts[i] = counts[i], counts[i] + rows.shape[0]
                if counts[i] // 1000 != before // 1000:
                    log.info("Extracted features of %d query images for feature blob %s", counts[i], blob)
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    for blob, sink, count in zip(blobs, sinks, counts):
        sink.close()
        log.info("Extracted features of %d query images for feature blob %s", count, blob)
    log.info("Successfully extracted the features!")


COMMANDS = [extract_features]
