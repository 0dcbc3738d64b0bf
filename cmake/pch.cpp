// Anchor translation unit for the precompiled torch header shared by tests, examples and
// benchmarks (see the top-level CMakeLists.txt). It defines nothing.
