"""The synthetic benchmark: stages 01-06 once per configuration on shared data (``runner``), the test
images scored with bootstrap intervals and paired differences (``stats``), and the report (``report``)."""
