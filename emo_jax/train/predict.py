"""placeholder, replaced below"""
class PredictError(Exception):
  pass
