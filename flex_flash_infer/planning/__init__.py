"""Planning: which launches cover a mask (routes, bands, key columns, tiles, splits, pages), as an
immutable plan the backends run."""
