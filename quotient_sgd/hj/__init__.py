"""The viscous Hamilton-Jacobi / Burgers engine (THEORY section 3), on Diffrax.

Grids, Fourier-spectral and finite-volume right-hand sides (gradient form p and value form u, 1-D and 2-D), an
exponential integrator for the stiff viscous term, differentiable Diffrax solves, exact Cole-Hopf references
(quadrature and Monte Carlo), shock detection and coarse-graining of loss slices.
"""

from ._cole_hopf import cole_hopf as cole_hopf
from ._cole_hopf import cole_hopf_gradient as cole_hopf_gradient
from ._cole_hopf import cole_hopf_monte_carlo as cole_hopf_monte_carlo
from ._cole_hopf import MC_MIN_ESS as MC_MIN_ESS
from ._cole_hopf import MonteCarloEstimate as MonteCarloEstimate
from ._etd import CachedCoefficients as CachedCoefficients
from ._etd import ETDRK4 as ETDRK4
from ._etd import etdrk4_coefficients as etdrk4_coefficients
from ._etd import SemilinearTerm as SemilinearTerm
from ._finite_volume import FiniteVolume as FiniteVolume
from ._grid import Grid as Grid
from ._grid import Grid2D as Grid2D
from ._solve import as_scheme as as_scheme
from ._solve import BurgersSolution as BurgersSolution
from ._solve import HJSolution as HJSolution
from ._solve import solve_burgers as solve_burgers
from ._solve import solve_hj as solve_hj
from ._solve import SPECTRAL_TAIL_WARN as SPECTRAL_TAIL_WARN
from ._spectral import Spectral as Spectral
from ._shocks import find_shocks as find_shocks
from ._shocks import shock_time as shock_time
from ._shocks import shock_time_from_hessian as shock_time_from_hessian
from ._shocks import Shocks as Shocks
from ._slices import loss_slice as loss_slice
from ._slices import slice_flow as slice_flow
from ._slices import SliceFlow as SliceFlow
