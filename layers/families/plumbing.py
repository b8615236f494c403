"""Blob plumbing: Concat, Slice, Split, Flatten, Reshape, Tile, Filter, BatchReindex, Crop.

No arithmetic: these layers move, view or select values (Caffe's shape rules).
"""

import numpy

from brewnet.layers.base import Layer
from brewnet.layers.families.axes import axis_slice, canonical_axis, int_indices, share_view
from brewnet.layers.kernels import parallel
from brewnet.layers.registry import register


@register("Concat", v1="CONCAT")
class Concat(Layer):
    min_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error("give either concat_param.axis or the legacy concat_dim, not both")

    def reshape(self, bottom, top):
        p = self.param.concat_param
        if p.HasField("concat_dim"):
            axis = int(p.concat_dim)
            if axis >= bottom[0].num_axes:
                raise self.error(f"concat_dim {axis} out of range for shape {bottom[0].shape}")
        else:
            axis = canonical_axis(self, bottom[0], p.axis)
        self.axis = axis
        shape = list(bottom[0].shape)
        for i, b in enumerate(bottom[1:], 1):
            if b.num_axes != len(shape) or any(
                    b.shape[j] != shape[j] for j in range(len(shape)) if j != axis):
                raise self.error(f"bottom {i} shape {b.shape} does not match bottom 0 shape "
                                        f"{bottom[0].shape} except along axis {axis}")
            shape[axis] += b.shape[axis]
        if len(bottom) == 1:
            share_view(top[0], bottom[0], bottom[0].shape)
        else:
            top[0].reshape(shape)

    def _blocks(self, whole, parts):
        """Copy pairs (top's block, part) as 2-D (outer, run) views, outer = the product of
        the axes before the concat axis: each part fills one column range of the top's rows."""
        if whole.size == 0:  # nothing to copy (and no rows to reshape into)
            return
        outer = int(numpy.prod(whole.shape[:self.axis], dtype=numpy.int64))
        rows = whole.reshape(outer, -1)
        start = 0
        for part in parts:
            run = part.size // max(outer, 1)
            yield rows[:, start:start + run], part.reshape(outer, run)
            start += run

    def _copy(self, pairs, to_top):
        """Every pair's copy, split over the top's rows on brewnet's threads (Inception's and
        SqueezeNet's concats: 10-20 MB each)."""
        pairs = list(pairs)
        if not pairs:
            return
        outer, size = pairs[0][0].shape[0], sum(p.size for p, _ in pairs)

        def rows(a, z):
            for block, part in pairs:
                if to_top:
                    block[a:z] = part[a:z]
                else:
                    part[a:z] = block[a:z]

        parallel.over_ranges(rows, outer, self.xp, outer > 1 and size >= 1 << 18)

    def forward(self, bottom, top):
        if len(bottom) == 1:
            share_view(top[0], bottom[0], bottom[0].shape)
            return
        self._copy(self._blocks(top[0].data, [b.data for b in bottom]), to_top=True)

    def backward(self, top, propagate_down, bottom):
        blocks = self._blocks(top[0].diff, [b.diff if down else b.data for b, down in zip(bottom, propagate_down)])
        self._copy([pair for pair, down in zip(blocks, propagate_down) if down], to_top=False)


@register("Slice", v1="SLICE")
class Slice(Layer):
    exact_bottoms = 1
    min_tops = 1

    def setup(self, bottom, top):
        p = self.param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise self.error("give either slice_param.axis or the legacy slice_dim, not both")

    def reshape(self, bottom, top):
        p = self.param.slice_param
        if p.HasField("slice_dim"):
            axis = int(p.slice_dim)
            if axis >= bottom[0].num_axes:
                raise self.error(f"slice_dim {axis} out of range for shape {bottom[0].shape}")
        else:
            axis = canonical_axis(self, bottom[0], p.axis)
        self.axis = axis
        length = bottom[0].shape[axis]
        points = [int(s) for s in p.slice_point]
        if points:
            if len(points) != len(top) - 1:
                raise self.error(f"{len(points)} slice_point(s) need {len(points) + 1} tops, got {len(top)}")
            if len(top) > length:
                raise self.error(f"cannot cut axis {axis} of length {length} into {len(top)} slices")
            bounds = [0] + points + [length]
            if any(b <= a for a, b in zip(bounds[:-2], bounds[1:-1])):
                raise self.error(f"slice_point values {points} must be increasing and positive")
            if bounds[-2] > length:
                raise self.error(f"slice_point {bounds[-2]} beyond axis {axis} length {length}")
        else:
            if length % len(top):
                raise self.error(f"{len(top)} tops do not evenly divide axis {axis} of length {length}")
            step = length // len(top)
            bounds = list(range(0, length + 1, step))
        self.bounds = bounds
        if len(top) == 1:
            share_view(top[0], bottom[0], bottom[0].shape)
            return
        for t, a, b in zip(top, bounds[:-1], bounds[1:]):
            shape = list(bottom[0].shape)
            shape[axis] = b - a
            t.reshape(shape)

    def forward(self, bottom, top):
        if len(top) == 1:
            share_view(top[0], bottom[0], bottom[0].shape)
            return
        for t, a, b in zip(top, self.bounds[:-1], self.bounds[1:]):
            t.data[...] = bottom[0].data[axis_slice(self.axis, a, b)]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        for t, a, b in zip(top, self.bounds[:-1], self.bounds[1:]):
            diff[axis_slice(self.axis, a, b)] = t.diff


@register("Split", v1="SPLIT")
class Split(Layer):
    exact_bottoms = 1
    min_tops = 1

    def reshape(self, bottom, top):
        for t in top:
            if t is bottom[0]:
                raise self.error("Split cannot work in place")
            share_view(t, bottom[0], bottom[0].shape)

    def forward(self, bottom, top):
        for t in top:  # every top shares the bottom's data, as in Caffe
            share_view(t, bottom[0], bottom[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        diff, xp = bottom[0].diff, self.xp
        if len(top) == 1:
            parallel.copy(diff, top[0].diff, xp)
            return
        # the first two added straight into the bottom's diff: one pass fewer than copy-then-add;
        # on brewnet's threads (ResNet-50's and Inception's splits: 40-50 ms an iteration on one)
        parallel.add(top[0].diff, top[1].diff, diff, xp)
        for t in top[2:]:
            parallel.add(diff, t.diff, diff, xp)


@register("Flatten", v1="FLATTEN")
class Flatten(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("Flatten cannot work in place")
        p = self.param.flatten_param
        start = canonical_axis(self, bottom[0], p.axis)
        end = canonical_axis(self, bottom[0], p.end_axis, "end_axis")
        shape = bottom[0].shape
        self.top_shape = shape[:start] + (bottom[0].count_range(start, end + 1),) + shape[end + 1:]
        share_view(top[0], bottom[0], self.top_shape)

    def forward(self, bottom, top):
        share_view(top[0], bottom[0], self.top_shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


@register("Reshape")
class Reshape(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("Reshape cannot work in place")
        dims = [int(d) for d in self.param.reshape_param.shape.dim]
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise self.error("reshape_param.shape may contain at most one -1")
        if any(d < -1 for d in dims):
            raise self.error(f"reshape_param.shape has a negative dimension other than -1: {dims}")
        self.inferred_axis = inferred[0] if inferred else None
        self.dims = dims

    def reshape(self, bottom, top):
        p = self.param.reshape_param
        b = bottom[0]
        n = b.num_axes
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise self.error(f"reshape_param.axis {p.axis} out of range for a {n}-axis bottom")
        if p.num_axes < -1:
            raise self.error("reshape_param.num_axes must be >= 0, or -1 for all")
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise self.error(f"axis + num_axes = {end} is beyond the bottom's {n} axes")
        shape = list(b.shape[:start]) + list(self.dims) + list(b.shape[end:])
        for i in self.copy_axes:
            if start + i >= n:
                raise self.error(f"shape dim {i} is 0 but the bottom has no axis {start + i} to copy")
            shape[start + i] = b.shape[start + i]
        if self.inferred_axis is not None:
            known = int(numpy.prod([d for j, d in enumerate(shape) if j != start + self.inferred_axis],
                                   dtype=numpy.int64))
            if known == 0 or b.count % known:
                raise self.error(f"bottom count {b.count} is not divisible by the given dimensions' product {known}")
            shape[start + self.inferred_axis] = b.count // known
        shape = tuple(shape)
        count = int(numpy.prod(shape, dtype=numpy.int64))
        if count != b.count:
            raise self.error(f"cannot reshape {b.shape} ({b.count} values) to {shape} ({count} values)")
        self.top_shape = shape
        share_view(top[0], b, shape)

    def forward(self, bottom, top):
        share_view(top[0], bottom[0], self.top_shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


@register("Tile")
class Tile(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.param.tile_param
        if not p.HasField("tiles"):
            raise self.error("tile_param.tiles must be given")
        if p.tiles <= 0:
            raise self.error("tile_param.tiles must be positive")
        self.tiles = int(p.tiles)

    def reshape(self, bottom, top):
        axis = canonical_axis(self, bottom[0], self.param.tile_param.axis)
        self.outer = bottom[0].count_range(0, axis)
        self.inner = bottom[0].count_range(axis)
        shape = list(bottom[0].shape)
        shape[axis] *= self.tiles
        top[0].reshape(shape)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.outer, 1, self.inner)
        top[0].data.reshape(self.outer, self.tiles, self.inner)[...] = x

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            d = top[0].diff.reshape(self.outer, self.tiles, self.inner).sum(axis=1)
            bottom[0].diff[...] = d.reshape(bottom[0].shape)


@register("Filter")
class Filter(Layer):
    min_bottoms = 2
    min_tops = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index != len(self.param.bottom) - 1  # the selector is last

    def setup(self, bottom, top):
        if len(top) != len(bottom) - 1:
            raise self.error(f"needs one top per filtered bottom: {len(bottom) - 1} top(s), got {len(top)}")
        self.first_reshape = True

    def _select(self, bottom):
        sel = bottom[-1]
        if any(d != 1 for d in sel.shape[1:]):
            raise self.error(f"selector shape {sel.shape} must be singleton after the first axis")
        for i, b in enumerate(bottom[:-1]):
            if b.shape[0] != sel.shape[0]:
                raise self.error(f"bottom {i} has {b.shape[0]} items but the selector has {sel.shape[0]}")
        # the only host sync: the output size depends on the data
        self.indices = self.xp.nonzero(sel.data.reshape(-1) != 0)[0]

    def _shape_tops(self, bottom, top, rows):
        for t, b in zip(top, bottom):
            t.reshape((rows,) + b.shape[1:])

    def reshape(self, bottom, top):
        self._select(bottom)
        # Caffe's first reshape sizes the tops like the bottoms
        rows = bottom[0].shape[0] if self.first_reshape else int(self.indices.size)
        self.first_reshape = False
        self._shape_tops(bottom, top, rows)

    def forward(self, bottom, top):
        self._select(bottom)
        self._shape_tops(bottom, top, int(self.indices.size))
        for t, b in zip(top, bottom):
            t.data[...] = b.data[self.indices]

    def backward(self, top, propagate_down, bottom):
        for t, b, down in zip(top, bottom, propagate_down):
            if down:
                diff = b.diff
                diff[...] = 0
                diff[self.indices] = t.diff
        if propagate_down[-1]:
            bottom[-1].diff[...] = 0  # selectors have no gradient


@register("BatchReindex")
class BatchReindex(Layer):
    exact_bottoms = 2
    exact_tops = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def reshape(self, bottom, top):
        if bottom[1].num_axes != 1:
            raise self.error(f"the index bottom must be 1-D, got shape {bottom[1].shape}")
        top[0].reshape((bottom[1].shape[0],) + bottom[0].shape[1:])

    def forward(self, bottom, top):
        self.index = int_indices(self, bottom[1].data, bottom[0].shape[0], "reindex index")
        if top[0].count:
            top[0].data[...] = bottom[0].data[self.index]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            diff = bottom[0].diff
            diff[...] = 0
            self.xp.add.at(diff, self.index, top[0].diff)
        if propagate_down[1]:
            bottom[1].diff[...] = 0



@register("Crop")
class Crop(Layer):
    """Crop bottom[0] to the shape of bottom[1] on the axes from `axis` on, at the given offsets."""

    exact_bottoms = 2
    exact_tops = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def setup(self, bottom, top):
        cp = self.param.crop_param
        n = bottom[0].num_axes
        self.axis = bottom[0].canonical_axis(cp.axis)
        offsets = list(cp.offset)
        if len(offsets) > 1 and self.axis + len(offsets) != n:
            raise self.error(
                f"{len(offsets)} offsets given for the {n - self.axis} axes "
                f"from axis {self.axis} of a {n}-axis input; give one, or one per cropped axis")
        self.offsets = offsets

    def reshape(self, bottom, top):
        src, ref = bottom[0].shape, bottom[1].shape
        if len(src) != len(ref):
            raise self.error(f"bottoms have different numbers of axes: {src} vs {ref}")
        slices, shape = [], []
        for i, size in enumerate(src):
            if i < self.axis:
                slices.append(slice(None))
                shape.append(size)
                continue
            off = 0
            if len(self.offsets) == 1:
                off = self.offsets[0]
            elif self.offsets:
                off = self.offsets[i - self.axis]
            if size - off < ref[i]:
                raise self.error(
                    f"the crop for axis {i} is out of bounds: size {ref[i]} "
                    f"at offset {off} in an axis of size {size}")
            slices.append(slice(off, off + ref[i]))
            shape.append(ref[i])
        self.slices = tuple(slices)
        top[0].reshape(shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[self.slices]

    def backward(self, top, propagate_down, bottom):
        # Caffe never propagates to the reference bottom
        if propagate_down[0]:
            dx = bottom[0].diff
            dx.fill(0)
            dx[self.slices] = top[0].diff
