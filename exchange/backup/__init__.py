"""Backup and disaster recovery for a hub or a node (``exchange backup``, ``exchange restore``).

A backup location (a directory, or an S3 prefix) holds any number of snapshots, of one
service or several, sharing one store of node blobs:

    blobs/<sha256[:2]>/<sha256>            encrypted instance blobs, named by content, so an
                                           incremental backup copies only new ones
    snapshots/<id>/db/NNNN.ndjson.enc      the database, one file per table, encrypted
    snapshots/<id>/db/schema.json.enc      the tables' portable schema (SQLite or PostgreSQL)
    snapshots/<id>/manifest.json           written last: what was backed up, and every
                                           file's size and SHA-256

The keys (a node's tenant and master keys, the hub's signing keys) go to a second
location, wrapped with the backup key, as ``<id>.keys``. See docs/operations.md.
"""
