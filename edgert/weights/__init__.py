"""Task weights held as blocks in the arena: block cache, task switcher, prewarm."""
