"""One file per method; each holds its LightningModule (losses are pure functions in `alignment.losses`).

A new method is a module here, a line in METHODS, and a test. METHODS names them without importing torch: the
package's top level and the tests read it.
"""

METHODS = {
    "DPO": "alignment.methods.dpo",
    "ORPO": "alignment.methods.orpo",
    "SimPO": "alignment.methods.simpo",
    "CPO": "alignment.methods.cpo",
}
