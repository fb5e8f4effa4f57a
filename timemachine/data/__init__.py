"""Package data: experimental target files shipped with timemachine.

* ``graf2007_ala3.json``: backbone scalar couplings of trialanine (uncapped Ala3, pH 2,
  300 K) from Graf, Nguyen, Stock & Schwalbe, J. Am. Chem. Soc. 129, 1179 (2007),
  Table S3 of the Supporting Information, in the target-file format of
  ``timemachine.fitting.targets`` (load it with ``timemachine.fitting.graf2007_targets``).
  The values in the file are the ones that public sources tabulate. Those for ALA2 (and ALA3's
  ²J(N,Cα)) match the experimental table of Beauchamp, Pande & Das, Biophys. J. 106, 1381
  (2014) (github.com/kyleabeauchamp/EnsemblePaper, data/experimental_data.csv, which cites
  "Table S3 in Schwalbe"). The file's "note" says which of the 14 couplings are missing
  and why. The uncertainties are the RMS of each coupling's Karplus relation
  (``timemachine.fitting.KARPLUS``), not the NMR measurement error.
"""
