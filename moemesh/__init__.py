"""moemesh: Mixture-of-Experts training over a 4-D device mesh (DP x EP x TP x PP)."""
