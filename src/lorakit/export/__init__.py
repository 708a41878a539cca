"""GGUF export: conversion and quantization (gguf), verification against transformers (verify)."""
