"""Support-ticket triage: three agents and one tool on the mesh (see README.md here)."""
