"""CDISC exports of the study (contract, "Standard exports (v2)"): SDTM DM, EX, LB, AE, DS and
ADaM ADSL, ADTTE, as SAS transport v5 and Dataset-JSON 1.1 — see docs/exports.md."""
