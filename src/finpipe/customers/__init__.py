"""The customers domain: segments learned from transactions, with identities that persist.

Modules: `config` (where a data source's columns are), `schema` (the raw contract),
`features` (point-in-time behavioural snapshots), `synthetic` (planted segments), `model`
(autoencoder + k-means with champion-aligned segment ids), `contract` (the ingest contract),
`pipeline` (the nightly steps).
"""
