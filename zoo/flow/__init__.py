"""Flow matching and Decentralized Diffusion Models (papers.md D1), pure JAX.

`zoo.flow.matching`: the interpolation, velocity target and loss of flow matching, Euler and Heun samplers,
classifier-free guidance, and the exact velocity of a Gaussian mixture (a reference for tests).
`zoo.flow.ensemble`: k-means, the router-weighted ensemble velocity of DDM and its sampler.
`zoo.flow.evaluation`: sample quality (Frechet distance, class accuracy, sample grids) for the evaluators.

Nothing is imported here; import the submodule you need (`from zoo.flow import matching`).
"""
